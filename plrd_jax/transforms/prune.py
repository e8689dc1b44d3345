"""Structured pruning: fixed masks -> a smaller dense model with the same function.

`prune(params, config, masks)` removes every unit whose mask is 0 and folds the other mask values into the
weights, so that the pruned model computes exactly what `Decoder(config)(tokens, masks=masks)` computes
(mask semantics: plrd_jax/model.py and plrd_jax/masks.py). With kept index sets I and values z:

  z_hidden [d]     embedding E[:, I]·z; attn_norm / mlp_norm scales s[I]·z; final norm s[I]·z when the LM head
                   is untied (tied: s[I], z is already in the shared table); rows I of q, k, v, gate, up and
                   of an untied lm_head; columns I of o and down, times z
  z_layer [L]      layers with z = 0 are dropped (the others renumbered in order); o and down outputs times z
  z_head [L, H]    columns of the kept query heads in q, rows of them in o (times z), columns of the kv groups
                   that keep a query head in k and v
  z_int [L, m]     columns I of gate and up (up times z), rows I of down

Each matrix may be dense (`kernel`) or factorized (`A`, `B`; lowrank or CoLA): rows are taken from K or A,
columns from K or B, and the rank is left alone. SLTrain matrices (a fixed sparse support) are refused.
Masks must be concrete (not traced): the output shapes depend on their values.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from plrd_jax.config import ModelConfig
from plrd_jax.masks import mask_shapes


class PruneError(ValueError):
    """Masks that do not describe a valid smaller model of the given config."""


def _kept(z: np.ndarray) -> np.ndarray:
    return np.flatnonzero(z != 0)


def _slice(node: dict, path: str, rows=None, cols=None, row_scale=None, col_scale=None) -> dict:
    """A matrix node with rows / columns of K = kernel or A B selected and scaled (rank unchanged)."""
    if "values" in node or "indices" in node:
        raise PruneError(f"{path} is an SLTrain matrix (fixed sparse support); densify it before pruning")
    out = dict(node)
    for key in ("kernel", "A"):
        if key in node:
            x = node[key]
            if rows is not None:
                x = x[rows]
            if row_scale is not None:
                x = x * jnp.asarray(row_scale, x.dtype)[:, None]
            out[key] = x
    for key in ("kernel", "B"):
        if key in node:
            x = out[key]
            if cols is not None:
                x = x[:, cols]
            if col_scale is not None:
                x = x * jnp.asarray(col_scale, x.dtype)[None, :]
            out[key] = x
    if "bias" in node and cols is not None:
        out["bias"] = node["bias"][cols] * (1 if col_scale is None else jnp.asarray(col_scale, node["bias"].dtype))
    return out


def _check_masks(masks: dict, config: ModelConfig) -> dict[str, np.ndarray]:
    shapes = mask_shapes(config)
    out = {}
    for name, z in masks.items():
        if z is None:
            continue
        if name not in shapes:
            raise PruneError(f"unknown mask {name!r}; expected some of {', '.join(shapes)}")
        z = np.asarray(z, np.float32)
        if z.shape != shapes[name]:
            raise PruneError(f"mask {name} has shape {z.shape}; this config needs {shapes[name]}")
        out[name] = z
    return out


def _one_count(counts: dict[int, int], what: str) -> int:
    values = sorted(set(counts.values()))
    if len(values) != 1:
        detail = ", ".join(f"layer {i}: {n}" for i, n in counts.items())
        raise PruneError(f"kept {what} differ between kept layers ({detail}); every layer must keep the same "
                         "number")
    if values[0] == 0:
        raise PruneError(f"the masks keep no {what}")
    return values[0]


def pruned_shape(masks: dict, config: ModelConfig) -> dict[str, int]:
    """The pruned model's num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size, checked to be a
    valid (GQA) model: every kept layer keeps as many heads and intermediate dims as the others, and every kv
    group it keeps holds the same number of kept query heads."""
    z = _check_masks(masks, config)
    L, H, KV = config.num_layers, config.num_heads, config.num_kv_heads
    layers = _kept(z["z_layer"]) if "z_layer" in z else np.arange(L)
    if len(layers) == 0:
        raise PruneError("the masks keep no layer")
    hidden = len(_kept(z["z_hidden"])) if "z_hidden" in z else config.hidden_size
    if hidden == 0:
        raise PruneError("the masks keep no hidden dimension")
    heads, groups, per_group, inter = {}, {}, {}, {}
    for i in layers:
        kept = (z["z_head"][i] != 0) if "z_head" in z else np.ones(H, bool)
        in_group = kept.reshape(KV, H // KV).sum(axis=1)
        heads[int(i)], groups[int(i)] = int(kept.sum()), int((in_group > 0).sum())
        sizes = sorted(set(in_group[in_group > 0].tolist()))
        if len(sizes) > 1:
            raise PruneError(f"layer {i} keeps {in_group.tolist()} query heads in its {KV} kv groups; a valid GQA "
                             "model keeps the same number in every kept group")
        per_group[int(i)] = sizes[0] if sizes else 0
        inter[int(i)] = int((z["z_int"][i] != 0).sum()) if "z_int" in z else config.intermediate_size
    num_heads = _one_count(heads, "heads")
    return {"num_layers": len(layers), "hidden_size": hidden, "num_heads": num_heads,
            "num_kv_heads": _one_count(groups, "kv groups"),
            "intermediate_size": _one_count(inter, "intermediate dims")}


def prune(params, config: ModelConfig, masks: dict) -> tuple[dict, ModelConfig]:
    """(params, config) of the smaller dense-shaped model equal in function to `config` run with `masks`.

    masks: any of z_layer [L], z_head [L, H], z_int [L, m], z_hidden [d] (a missing one keeps everything).
    The new config states head_dim explicitly and keeps each surviving matrix's LinearSpec.
    """
    shape = pruned_shape(masks, config)
    z = _check_masks(masks, config)
    L, H, KV, hd = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim_
    group = H // KV
    z_hidden = z.get("z_hidden")
    h_rows = _kept(z_hidden) if z_hidden is not None else None
    h_scale = z_hidden[h_rows] if z_hidden is not None else None
    layers = _kept(z["z_layer"]) if "z_layer" in z else np.arange(L)

    out = {}
    embedding = params["embed"]["embedding"]
    if h_rows is not None:
        embedding = embedding[:, h_rows] * jnp.asarray(h_scale, embedding.dtype)
    out["embed"] = {"embedding": embedding}

    def norm(node, fold=True):
        scale = node["scale"]
        if h_rows is None:
            return dict(node)
        scale = scale[h_rows] * (jnp.asarray(h_scale, scale.dtype) if fold else 1)
        return {**node, "scale": scale}

    linears = {}
    for new, i in enumerate(layers):
        block = params[f"layers_{i}"]
        z_layer = z["z_layer"][i] if "z_layer" in z else 1.0
        out_scale = (h_scale if h_scale is not None else np.ones(config.hidden_size, np.float32)) * z_layer
        head_z = z["z_head"][i] if "z_head" in z else np.ones(H, np.float32)
        heads = _kept(head_z)
        groups = np.unique(heads // group)
        q_cols = (heads[:, None] * hd + np.arange(hd)).reshape(-1)
        kv_cols = (groups[:, None] * hd + np.arange(hd)).reshape(-1)
        o_scale = np.repeat(head_z[heads], hd)
        int_z = z["z_int"][i] if "z_int" in z else np.ones(config.intermediate_size, np.float32)
        inter = _kept(int_z)
        attn, mlp = block["attn"], block["mlp"]
        p = f"layers_{i}"
        out[f"layers_{new}"] = {
            "attn_norm": norm(block["attn_norm"]),
            "mlp_norm": norm(block["mlp_norm"]),
            "attn": {
                "q": _slice(attn["q"], f"{p}/attn/q", h_rows, q_cols),
                "k": _slice(attn["k"], f"{p}/attn/k", h_rows, kv_cols),
                "v": _slice(attn["v"], f"{p}/attn/v", h_rows, kv_cols),
                "o": _slice(attn["o"], f"{p}/attn/o", q_cols, h_rows, o_scale, out_scale),
            },
            "mlp": {
                "gate": _slice(mlp["gate"], f"{p}/mlp/gate", h_rows, inter),
                "up": _slice(mlp["up"], f"{p}/mlp/up", h_rows, inter, None, int_z[inter]),
                "down": _slice(mlp["down"], f"{p}/mlp/down", inter, h_rows, None, out_scale),
            },
        }
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            block_name = "attn" if name in ("q", "k", "v", "o") else "mlp"
            spec = config.linear(f"{p}/{block_name}/{name}")
            if spec.kind != "dense":
                linears[f"layers_{new}/{block_name}/{name}"] = spec
    out["final_norm"] = norm(params["final_norm"], fold=not config.tie_embeddings)
    if "lm_head" in params:
        out["lm_head"] = _slice(params["lm_head"], "lm_head", h_rows)
        if config.linear("lm_head").kind != "dense":
            linears["lm_head"] = config.linear("lm_head")
    new_config = config.replace(**shape, head_dim=hd, linears=())
    return out, new_config.with_linears(linears)
