"""A LLaMA-family decoder in Flax linen: RMSNorm, RoPE, GQA attention, SwiGLU MLP, block, decoder.

Parameter paths (stable; the transforms address matrices by them):

  embed/embedding                        (vocab, d)
  layers_{i}/attn_norm/scale             (d,)
  layers_{i}/attn/{q,k,v,o}/...          one `Linear` each: kernel | A, B | A, B, values (see linears.py)
  layers_{i}/mlp_norm/scale              (d,)
  layers_{i}/mlp/{gate,up,down}/...
  final_norm/scale                       (d,)
  lm_head/...                            only when embeddings are untied

Stacked layout (a scanned decoder whose layers all share one shape, `ModelConfig.scan_layers`; MaxText's):
every `layers_{i}` subtree above becomes one subtree `layers/...` whose leaves carry a leading layer axis L,
e.g. layers/attn/q/kernel (L, d, H·hd). `stack_layers` / `unstack_layers` convert between the two; the decoder
runs either (`plrd_jax/nn/layout.py` has the layout's functions).

Kernels are (d_in, d_out), `y = x K` (the transpose of a PyTorch/HF weight).

Structured-pruning masks (Sheared-LLaMA, see plrd_jax/masks.py): `Decoder(...)(tokens, masks=...)` takes an
optional dict with any of `z_layer [L]`, `z_head [L, H]`, `z_int [L, m]`, `z_hidden [d]`. z_layer scales a
layer's attention and MLP outputs; z_head each query head's attention output (before o); z_int `up(x)`;
z_hidden the embeddings, the attention and MLP outputs and every RMSNorm's output, whose mean square is then
taken over the kept (z_hidden ≠ 0) dims only. Without masks the computation is exactly the unmasked one.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.layout import STACK, layer_runs, stack_layers, stores_stacked
from plrd_jax.nn.linears import BOTTLENECK, Linear

Cache = list[dict[str, jax.Array]]


class RMSNorm(nn.Module):
    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, z_hidden=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        if z_hidden is None:
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
            return scale.astype(x.dtype) * h.astype(x.dtype)
        kept = (z_hidden != 0).astype(jnp.float32)  # mean square over the kept dims only
        mean_sq = jnp.sum(h * h * kept, axis=-1, keepdims=True) / jnp.maximum(jnp.sum(kept), 1.0)
        h = h * jax.lax.rsqrt(mean_sq + self.eps)
        return scale.astype(x.dtype) * h.astype(x.dtype) * z_hidden.astype(x.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and signed sin of the rotary angles, (B, T, 1, head_dim) each, HF "rotate half" layout: the sin of
    the first half is negated, so that `rope` needs no negation. Computed once per forward and shared by every
    layer: computed inside each layer, XLA fused the cos and sin into every rotated element, recomputing them
    (docs/performance.md)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, hd/2)
    sin = jnp.sin(angles)
    return (jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :],
            jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :])


def rope(x: jax.Array, cos: jax.Array, signed_sin: jax.Array) -> jax.Array:
    """Rotary embedding of x (B, T, heads, hd) by the tables of `rotary_tables`: x·cos + (x2, x1)·(-sin, sin).
    The halves are swapped by reversing a (2, hd/2) axis rather than by concatenating them: XLA:CPU fuses the
    rotation into the attention's head-first transposes and block slices, and a fused concatenate (a per-element
    select) made those copies several times slower (docs/performance.md)."""
    swapped = jnp.flip(x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2), axis=-2).reshape(x.shape)
    return x * cos.astype(x.dtype) + swapped * signed_sin.astype(x.dtype)


def linear(config: ModelConfig, path: str, features: int, name: str, use_bias: bool = False) -> Linear:
    return Linear(features, config.linear(path), use_bias, config.jnp_dtype, config.jnp_param_dtype,
                  config.sparse_method, name=name)


HALF_DTYPES = (jnp.bfloat16, jnp.float16)


class Attention(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, rotary, cache: dict | None = None, z_head=None):
        c, p = self.config, f"layers_{self.layer}/attn"
        B, T, _ = x.shape
        H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim_
        q = linear(c, f"{p}/q", H * hd, "q", c.qkv_bias)(x).reshape(B, T, H, hd)
        k = linear(c, f"{p}/k", KV * hd, "k", c.qkv_bias)(x).reshape(B, T, KV, hd)
        v = linear(c, f"{p}/v", KV * hd, "v", c.qkv_bias)(x).reshape(B, T, KV, hd)
        q, k = rope(q, *rotary), rope(k, *rotary)
        k_pos = positions
        if cache is not None:  # write this chunk at its positions, attend over the whole cache
            start = positions[0, 0]
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
            cache = {"k": k, "v": v}
            k_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), (B, k.shape[1]))
        if cache is None and z_head is None and jax.default_backend() == "gpu" and q.dtype in HALF_DTYPES:
            # cuDNN's fused attention: the T × T scores never reach device memory
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True,
                                               implementation="cudnn")
        else:
            # without a cache, q and k are the same tokens in order: key blocks after a query block are skipped
            blocks = 1 if cache is not None else causal_blocks(T)
            out = masked_attention(q, k, v, positions, k_pos, z_head, c.jnp_dtype, blocks)
        return linear(c, f"{p}/o", c.hidden_size, "o")(out.reshape(B, T, H * hd)), cache


def causal_blocks(length: int, min_block: int = 64, max_blocks: int = 8) -> int:
    """How many query blocks `masked_attention` splits a causal sequence of `length` into: blocks of at least
    `min_block` queries (smaller products run far below a CPU's matmul rate), at most `max_blocks` (HLO size)."""
    for n in range(max_blocks, 1, -1):
        if length % n == 0 and length // n >= min_block:
            return n
    return 1


def masked_attention(q, k, v, positions, k_pos, z_head, dtype, blocks: int = 1):
    """Grouped-query attention of q (B, T, H, hd) over k, v (B, S, KV, hd), query t seeing key s where
    k_pos[s] <= positions[t]; softmax in float32; each query head scaled by z_head (H,) if given.

    Returns (B, T, KV, H/KV, hd). Heads go first and each kv head's H/KV query heads are stacked along the query
    axis, so both products are plain (G·T × hd) · (hd × S) matmuls batched over (B, KV): on a CPU this is faster
    than batching over the query groups as well (docs/performance.md).

    blocks > 1 splits the queries into that many equal blocks, block i attending to the first (i + 1)·T/blocks
    keys only. That is exact when no query sees a later key (q and k the same sequence with increasing positions,
    as without a cache) and skips the fully masked products: 4 blocks do 10/16 of the work of one.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    if blocks > 1 and (T % blocks or k.shape[1] != T):
        raise ValueError(f"{blocks} causal blocks need T = S divisible by them; got T={T}, S={k.shape[1]}")
    q = q.reshape(B, T, KV, G, hd).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, hd)
    k, v = (a.astype(q.dtype).transpose(0, 2, 1, 3) for a in (k, v))  # (B, KV, S, hd)
    n = T // blocks
    outs = []
    for i in range(blocks):
        queries, seen = slice(i * n, (i + 1) * n), slice(0, (i + 1) * n if blocks > 1 else k.shape[2])
        qi = q[:, :, :, queries].reshape(B, KV, G * n, hd)  # rows: g-major, then t
        scores = jnp.einsum("bkqd,bksd->bkqs", qi, k[:, :, seen]) / jnp.sqrt(hd).astype(q.dtype)
        causal = jnp.tile(k_pos[:, None, seen] <= positions[:, queries, None], (1, G, 1))  # (B, G·n, S_i)
        scores = jnp.where(causal[:, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, v[:, :, seen].astype(probs.dtype)).reshape(B, KV, G, n, hd))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
    out = out.transpose(0, 3, 1, 2, 4)
    if z_head is not None:  # query head h = kv·G + g
        out = out * z_head.reshape(KV, G, 1).astype(out.dtype)
    return out


class MLP(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, z_int=None):
        c, p = self.config, f"layers_{self.layer}/mlp"
        gate = linear(c, f"{p}/gate", c.intermediate_size, "gate")(x)
        up = linear(c, f"{p}/up", c.intermediate_size, "up")(x)
        if z_int is not None:
            up = up * z_int.astype(up.dtype)
        if not c.only_lr_act:  # CoLA's only_lr_act: the low-rank activations are the MLP's only nonlinearity
            gate = nn.silu(gate)
        return linear(c, f"{p}/down", c.hidden_size, "down")(gate * up)


class Block(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, rotary, cache=None, masks=None):
        c = self.config
        if masks is None:
            h, cache = Attention(c, self.layer, name="attn")(
                RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="attn_norm")(x), positions, rotary, cache)
            x = x + h
            x = x + MLP(c, self.layer, name="mlp")(RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="mlp_norm")(x))
            return x, cache
        # masks: this layer's {z_layer (), z_head (H,), z_int (m,), z_hidden (d,)}, each optional
        z_hidden, out_scale = masks.get("z_hidden"), 1.0
        for z in (masks.get("z_layer"), z_hidden):
            out_scale = out_scale if z is None else out_scale * z.astype(x.dtype)
        h, cache = Attention(c, self.layer, name="attn")(
            RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="attn_norm")(x, z_hidden), positions, rotary, cache,
            masks.get("z_head"))
        x = x + h * out_scale
        h = MLP(c, self.layer, name="mlp")(
            RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="mlp_norm")(x, z_hidden), masks.get("z_int"))
        return x + h * out_scale, cache


class Decoder(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab) in float32; with a cache also returns the updated cache.

    positions (B, T), default 0..T-1, must increase along T: without a cache, attention treats the tokens as one
    causal sequence (see `masked_attention`'s blocks)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, cache: Cache | None = None, masks: dict | None = None):
        c = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)
        z_hidden = None if masks is None else masks.get("z_hidden")
        if z_hidden is not None:
            x = x * z_hidden.astype(x.dtype)
        rotary = rotary_tables(positions, c.head_dim_, c.rope_theta)
        new_cache = []
        block = Block if c.remat == "none" else nn.remat(Block, policy=remat_policy(c.remat))
        stacked = not self.is_initializing() and STACK in self.variables["params"]
        scan = stacked or (c.scan_layers and not self.is_initializing())
        runs = ([(0, c.num_layers)] if stacked else layer_runs(c) if scan
                else [(i, i + 1) for i in range(c.num_layers)])
        for start, stop in runs:
            if stop - start > 1:
                x, caches = self._scanned(start, stop, x, positions, rotary, cache, masks)
                new_cache.extend(caches)
                continue
            layer_masks = None if masks is None else _layer_masks(masks, start)
            x, layer_cache = block(c, start, name=f"layers_{start}")(
                x, positions, rotary, None if cache is None else cache[start], layer_masks)
            new_cache.append(layer_cache)
        x = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="final_norm")(x, z_hidden)
        if c.tie_embeddings:  # embed.attend(x), on (tokens, d) like every other matmul (see linears.Linear)
            table = embed.embedding.astype(c.jnp_dtype)
            logits = (x.reshape(-1, x.shape[-1]) @ table.T).reshape(*x.shape[:-1], c.vocab_size)
        else:
            logits = linear(c, "lm_head", c.vocab_size, "lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


    def _scanned(self, start: int, stop: int, x, positions, rotary, cache, masks):
        """Layers [start, stop) (identical specs) under one `jax.lax.scan`: their params (stored stacked, or
        stacked here), cache entries and masks along a leading layer axis, one `Block` applied per step
        (remat'ed per layer)."""
        c, variables = self.config, self.variables["params"]

        def stack(trees):
            return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        params = variables[STACK] if STACK in variables else stack([variables[f"layers_{i}"]
                                                                     for i in range(start, stop)])
        caches = None if cache is None else stack(cache[start:stop])
        layer_masks = None if masks is None else stack([_layer_masks(masks, i) for i in range(start, stop)])
        block = Block(c, start, parent=None)

        def body(h, xs):
            p, layer_cache, m = xs
            return block.apply({"params": p}, h, positions, rotary, layer_cache, m)
        if c.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(c.remat), prevent_cse=False)
        x, new = jax.lax.scan(body, x, (params, caches, layer_masks))
        return x, [None if new is None else jax.tree.map(lambda a: a[i], new) for i in range(stop - start)]


def remat_policy(name: str):
    """The `jax.checkpoint` policy of each block for `ModelConfig.remat` (only the block's input is kept besides):
    full: nothing saved, the whole block recomputed in the backward pass; dots: matmul outputs without batch
    dims saved (projections kept, attention and elementwise work recomputed); bottleneck (CoLA-M): only the
    r-dim activations x A of factorized linears (tagged `linears.BOTTLENECK`) saved."""
    policies = jax.checkpoint_policies
    if name == "full":
        return policies.nothing_saveable
    if name == "dots":
        return policies.dots_with_no_batch_dims_saveable
    if name == "bottleneck":
        return policies.save_only_these_names(BOTTLENECK)
    raise ValueError(f"unknown remat policy {name!r}; expected full, dots or bottleneck")


def _layer_masks(masks: dict, i: int) -> dict:
    """Layer i's slice of a mask dict: z_layer[i], z_head[i], z_int[i]; z_hidden is shared."""
    out = {name: masks[name][i] for name in ("z_layer", "z_head", "z_int") if masks.get(name) is not None}
    if masks.get("z_hidden") is not None:
        out["z_hidden"] = masks["z_hidden"]
    return out


def init_cache(config: ModelConfig, batch: int, length: int) -> Cache:
    """An empty KV cache for decoding up to `length` positions: per layer {"k", "v"} zeros of shape
    (batch, length, num_kv_heads, head_dim) in the compute dtype (`Decoder.apply(..., cache=, position=)`)."""
    shape = (batch, length, config.num_kv_heads, config.head_dim_)
    return [{"k": jnp.zeros(shape, config.jnp_dtype), "v": jnp.zeros(shape, config.jnp_dtype)}
            for _ in range(config.num_layers)]


def init_params(config: ModelConfig, seed: int = 0) -> dict:
    """Randomly initialized params (the "params" collection) for `config`: stacked (`stack_layers`) when
    `config.scan_layers` and its layers all share one shape, else one subtree per layer."""
    params = Decoder(config).init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))["params"]
    return stack_layers(params, config) if stores_stacked(config) else params




def abstract_params(config: ModelConfig, shardings=None):
    """ShapeDtypeStructs of `config`'s params (no arrays are allocated), optionally with shardings (a matching
    pytree; default: the first device): the target of a restore and the input of an ahead-of-time lowering."""
    shapes = jax.eval_shape(lambda: init_params(config))
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
