"""Minitron: structured pruning by activation importance (Muralidharan et al., 2024, arXiv 2407.14679; Sreenivas
et al., 2024, arXiv 2408.11796), the baseline without its distillation step.

Importance comes from forward passes only, over calibration windows w = 1..N of T tokens each. A unit's
activation a_w (T, k) in window w (k = 1 for a scalar unit, hd for an attention head) is reduced over the
sequence by an L2 norm and over the batch by a mean (the aggregation the papers settle on):

  agg(a) = (1/N) Σ_w ‖a_w‖_F,     ‖a_w‖_F = sqrt(Σ_t Σ_k a_w[t, k]²)

  heads  [L, H]  agg of query head h's attention output (T, hd), the input of `o` before its projection
  int    [L, m]  agg of MLP channel j's activation silu(gate(x))_j · up(x)_j, the input of `down`
  hidden [d]     Σ over the 2L RMSNorms (attn_norm, mlp_norm of every layer) of agg of channel i of the
                 norm's output (the papers' LayerNorm-activation importance)
  layers [L]     block importance 1 − mean_{w,t} cos(x_in[w, t], x_out[w, t]), x_in / x_out the layer's
                 input and output hidden states (d,)

The activations are read with a Flax method interceptor (as `plrd_jax.transforms.calibrate` does): the inputs of `o`,
`down`, `q` (= attn_norm's output) and `gate` (= mlp_norm's output) of every layer, and the input and output of
every `Block`; the model is untouched. The pruned model keeps the top-ranked units of a target shape
(`minitron_masks`; heads by the GQA rule of `plrd_jax.nn.masks`, the lowest-importance layers dropped) and
`plrd_jax.transforms.prune.prune` folds the 0/1 masks into a smaller dense model.

Width targets for a parameter budget (`target_for_budget`, mode "width"): layers and kv heads stay; the rule
ties the kept fractions f_d (hidden size), f_h (query heads) and f_m (intermediate size) by

  f_d ≈ f_h ≈ sqrt(f_m)

so the MLP shrinks first and fastest, the hidden size and the heads next (the papers' width-pruned models cut
the MLP by at least as much as the embedding channels; most keep every head, and here the heads go with the
hidden size so that H·hd stays near d). Heads are pruned evenly within the kv groups (a GQA parent keeps all its
kv heads; an MHA parent drops whole heads), the hidden size is a multiple of the kept heads (what transformers'
LlamaConfig accepts). For each (heads, hidden) on that grid the intermediate size is solved for the budget
exactly, and of the shapes within `tolerance` of the budget the one closest to the rule,
min (ln f_d − ½ ln f_m)² + (ln f_h − ½ ln f_m)², is chosen. Heads come in steps (one query head per kv group),
so where a smaller budget first drops a step the hidden and intermediate sizes may grow back a little.
Depth targets drop layers only; one layer is the step, so the count is the nearest a whole number of layers
gives and may miss the tolerance.

Parameter counts are of the dense pruned config (embedding, tied or untied head, norms, biases).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.linears import Linear
from plrd_jax.nn.layout import unstack_layers
from plrd_jax.nn.model import Block, Decoder
from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.prune import prune

MODES = ("width", "depth")


# ---- importance ---------------------------------------------------------------------------------
def _record(records: dict):
    """Interceptor: records[path] = input of every Linear; records[layers_i] = (input, output) of every Block."""
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, (Linear, Block)):
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        records[path] = args[0] if isinstance(context.module, Linear) else (args[0], out[0])
        return out
    return nn.intercept_methods(interceptor)


def _agg(x: jax.Array, weights: jax.Array, axes: tuple[int, ...] = (1,)) -> jax.Array:
    """x (B, T, ...) -> Σ_b weights[b] · sqrt(Σ x[b]² over `axes`): the L2 norm over the sequence (and any
    other `axes`), summed over the batch with weights (0 for padding windows)."""
    x = x.astype(jnp.float32)
    return jnp.tensordot(weights, jnp.sqrt(jnp.sum(x * x, axis=axes)), axes=1)


@functools.lru_cache(maxsize=8)
def _jitted_step(config: ModelConfig):
    """(params, tokens (B, T), weights (B,)) -> the weighted batch sums, float32: heads (L, H), int (L, m),
    hidden (d,) as in the module docstring before the mean over windows, and cos (L,) = Σ_b weights[b] Σ_t
    cos(x_in, x_out) of each layer."""
    model = Decoder(config.replace(scan_layers=False))  # the interceptor records each layer by its path
    L, H, hd = config.num_layers, config.num_heads, config.head_dim_

    def step(params, tokens, weights):
        records: dict = {}
        with _record(records):
            model.apply({"params": params}, tokens)
        B, T = tokens.shape
        heads, inter, cos, hidden = [], [], [], 0.0
        for i in range(L):
            p = f"layers_{i}"
            heads.append(_agg(records[f"{p}/attn/o"].reshape(B, T, H, hd), weights, axes=(1, 3)))
            inter.append(_agg(records[f"{p}/mlp/down"], weights))
            hidden = hidden + _agg(records[f"{p}/attn/q"], weights) + _agg(records[f"{p}/mlp/gate"], weights)
            x_in, x_out = (x.astype(jnp.float32) for x in records[p])
            dots = jnp.sum(x_in * x_out, axis=-1)
            norms = jnp.sqrt(jnp.sum(x_in * x_in, axis=-1) * jnp.sum(x_out * x_out, axis=-1))
            cos.append(jnp.dot(weights, jnp.sum(dots / jnp.maximum(norms, 1e-12), axis=1)))
        return {"heads": jnp.stack(heads), "int": jnp.stack(inter), "hidden": hidden, "cos": jnp.stack(cos)}

    return jax.jit(step)


def importance(config: ModelConfig, params, windows: np.ndarray, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Activation importance of every unit over calibration `windows` [N, T] (int tokens), forward passes only:
    {"heads": [L, H], "int": [L, m], "hidden": [d], "layers": [L]} as float64 numpy arrays (module docstring).

    Batches of `batch_size` windows, the last one padded with weight-0 windows, one jitted step each; sums
    in float32 on the device per batch, float64 across batches."""
    params = unstack_layers(params)  # recorded per layer, by path
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] == 0:
        raise ValueError(f"calibration windows must be [N, T] with N, T >= 1, got shape {windows.shape}")
    if windows.shape[1] > config.max_seq_len:
        raise ValueError(f"window length {windows.shape[1]} exceeds the model's max_seq_len {config.max_seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    n, T = windows.shape
    batch_size = min(batch_size, n)
    step = _jitted_step(config.replace(remat="none"))  # no gradients: rematerialization would only add work
    sums: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:len(batch)] = 1.0
        batch = np.concatenate([batch, np.zeros((batch_size - len(batch), T), batch.dtype)])
        out = step(params, jnp.asarray(batch, jnp.int32), jnp.asarray(weights))
        for name, x in out.items():
            sums[name] = sums.get(name, 0.0) + np.asarray(x, np.float64)
    return {"heads": sums["heads"] / n, "int": sums["int"] / n, "hidden": sums["hidden"] / n,
            "layers": 1.0 - sums["cos"] / (n * T)}


# ---- masks --------------------------------------------------------------------------------------
def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """float32 0/1 of the k highest scores along the last axis (ties: the lower index first)."""
    order = np.argsort(-np.asarray(scores, np.float64), axis=-1, kind="stable")
    ranks = np.argsort(order, axis=-1, kind="stable")
    return (ranks < k).astype(np.float32)


def minitron_masks(config: ModelConfig, imp: dict, target: M.TargetShape) -> dict[str, np.ndarray]:
    """0/1 masks z_layer [L], z_head [L, H], z_int [L, m], z_hidden [d] keeping the `target`'s counts of the
    highest-importance units of `imp` (from `importance`): the num_layers layers of highest block importance,
    per layer the intermediate_size best MLP channels, the hidden_size best embedding channels, and per layer
    the heads by the GQA rule of `plrd_jax.nn.masks` (the heads/kv best query heads of each kv group, in the kv
    groups whose picked heads sum highest). Raises `masks.ShapeError` for a target the parent cannot take."""
    target = target.resolve(config)
    heads = M._keep_heads(jnp.asarray(imp["heads"], jnp.float32), config.num_kv_heads, target.num_heads,
                          target.num_kv_heads)
    return {"z_layer": _top(imp["layers"], target.num_layers),
            "z_head": np.asarray(heads, np.float32),
            "z_int": _top(imp["int"], target.intermediate_size),
            "z_hidden": _top(imp["hidden"], target.hidden_size)}


# ---- targets ------------------------------------------------------------------------------------
def dense_count(config: ModelConfig) -> int:
    """Parameters of a dense `config`: V·d embedding (+ d·V untied head) + d final norm + per layer
    2d norms + d·hd·(2H + 2KV) attention + 3·d·m MLP (+ hd·(H + 2KV) qkv biases)."""
    c = config
    d, hd, H, KV = c.hidden_size, c.head_dim_, c.num_heads, c.num_kv_heads
    layer = 2 * d + d * hd * 2 * (H + KV) + 3 * d * c.intermediate_size + (hd * (H + 2 * KV) if c.qkv_bias else 0)
    return c.vocab_size * d * (1 if c.tie_embeddings else 2) + d + c.num_layers * layer


def _head_options(config: ModelConfig) -> list[tuple[int, int]]:
    """(num_heads, num_kv_heads) a width target may take: query heads dropped evenly within the kv groups
    (GQA), or whole heads (MHA)."""
    H, KV = config.num_heads, config.num_kv_heads
    if H == KV:
        return [(h, h) for h in range(1, H + 1)]
    return [(KV * g, KV) for g in range(1, H // KV + 1)]


def target_for_budget(config: ModelConfig, budget_params: int, mode: str = "width",
                      tolerance: float = 0.01) -> M.TargetShape:
    """A target shape of `config` whose dense parameter count (`dense_count`) is within `tolerance` of
    `budget_params`: "width" by the rule of the module docstring (f_d ≈ f_h ≈ sqrt(f_m), layers and kv heads
    kept), "depth" the number of layers nearest the budget (the rest of the shape kept). Raises ValueError
    when the budget cannot be reached."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if config.linears:
        raise ValueError("Minitron targets count dense matrices; this config has factorized or sparse ones")
    full = dense_count(config)
    if not 0 < budget_params <= full * (1 + tolerance):
        raise ValueError(f"budget {budget_params:,} params is not in (0, {full:,}], the parent's count")
    L, d, m = config.num_layers, config.hidden_size, config.intermediate_size

    def shape(**kw) -> M.TargetShape:
        dims = dict(num_layers=L, hidden_size=d, num_heads=config.num_heads, intermediate_size=m,
                    num_kv_heads=config.num_kv_heads)
        return M.TargetShape(**{**dims, **kw})

    def count(target: M.TargetShape) -> int:
        return dense_count(target.config(config))

    if mode == "depth":
        fixed = count(shape(num_layers=0)) if L else full  # num_layers 0 only counts; it is never returned
        per_layer = (full - fixed) / L
        layers = min(L, round((budget_params - fixed) / per_layer))
        if layers < 1:
            raise ValueError(f"budget {budget_params:,} params is below one layer's model "
                             f"({count(shape(num_layers=1)):,}) for depth pruning")
        return shape(num_layers=layers)

    best, best_score = None, math.inf
    for heads, kv in _head_options(config):
        for hidden in range(heads, d + 1, heads):
            base = count(shape(num_heads=heads, num_kv_heads=kv, hidden_size=hidden, intermediate_size=0))
            inter = round((budget_params - base) / (3 * hidden * L))
            if not 1 <= inter <= m:
                continue
            target = shape(num_heads=heads, num_kv_heads=kv, hidden_size=hidden, intermediate_size=inter)
            if abs(count(target) - budget_params) > tolerance * budget_params:
                continue
            half_log_m = 0.5 * math.log(inter / m)
            score = (math.log(hidden / d) - half_log_m) ** 2 + (math.log(heads / config.num_heads) - half_log_m) ** 2
            if score < best_score:
                best, best_score = target, score
    if best is None:
        heads, kv = _head_options(config)[0]
        smallest = count(shape(num_heads=heads, num_kv_heads=kv, hidden_size=heads, intermediate_size=1))
        raise ValueError(f"budget {budget_params:,} params is out of width pruning's reach for this parent "
                         f"(from {smallest:,} to {full:,} params, within {tolerance:.0%})")
    return best


def minitron_prune(config: ModelConfig, params, windows: np.ndarray, budget_params: int, mode: str = "width",
                   batch_size: int = 4) -> tuple[dict, ModelConfig, dict]:
    """Minitron one-shot pruning of (config, params) to `budget_params`: the target of `target_for_budget`,
    importance over `windows` [N, T], its masks, then `prune`. Returns (params, config, report), report
    {"mode", "budget", "target" (TargetShape.to_dict), "params" (the pruned model's count), "dropped_layers"
    (the parent's indices)}."""
    target = target_for_budget(config, budget_params, mode)
    imp = importance(config, params, windows, batch_size)
    masks = minitron_masks(config, imp, target)
    new_params, new_config = prune(params, config, masks)
    report = {"mode": mode, "budget": int(budget_params), "target": target.resolve(config).to_dict(),
              "params": count_params(new_params),
              "dropped_layers": [int(i) for i in np.flatnonzero(masks["z_layer"] == 0)]}
    return new_params, new_config, report
