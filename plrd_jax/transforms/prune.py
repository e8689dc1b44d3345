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

import dataclasses

import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.masks import mask_shapes


class PruneError(ValueError):
    """Masks that do not describe a valid smaller model of the given config."""


def _kept(z: np.ndarray) -> np.ndarray:
    return np.flatnonzero(z != 0)


@dataclasses.dataclass(frozen=True)
class Cut:
    """What pruning does to one param node (a matrix, norm or the embedding): move it to `path`, keep `rows` /
    `cols` of it (None: all) and scale what is kept. A matrix's rows are those of K = kernel or A, its columns
    those of K or B (the rank is left alone); a norm's scale and a bias are cut like columns."""

    path: tuple[str, ...]
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    row_scale: np.ndarray | None = None
    col_scale: np.ndarray | None = None


def _scaled(x, scale, inplace: bool):
    scale = np.asarray(scale, x.dtype)
    if inplace:
        x *= scale
        return x
    return x * scale


def apply_cut(leaf: str, x, cut: Cut, inplace: bool = False):
    """Leaf `leaf` ("kernel", "A", "B", "bias", "scale", "embedding") of a node after `cut`; numpy or jax.
    inplace: x is a numpy array the caller owns and the cut only scales: scale it in place (no copy)."""
    if leaf in ("values", "indices"):
        raise PruneError(f"{'/'.join(cut.path)} is an SLTrain matrix (fixed sparse support); densify it before "
                         "pruning")
    if leaf in ("kernel", "A"):
        if cut.rows is not None:
            x = x[cut.rows]
        if cut.row_scale is not None:
            x = _scaled(x, np.asarray(cut.row_scale)[:, None], inplace)
    if leaf in ("kernel", "B", "embedding"):
        if cut.cols is not None:
            x = x[:, cut.cols]
        if cut.col_scale is not None:
            x = _scaled(x, np.asarray(cut.col_scale)[None, :], inplace)
    if leaf in ("bias", "scale"):
        if cut.cols is not None:
            x = x[cut.cols]
        if cut.col_scale is not None:
            x = _scaled(x, cut.col_scale, inplace)
    return x


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


def prune_cuts(config: ModelConfig, masks: dict) -> tuple[dict[tuple[str, ...], Cut], ModelConfig]:
    """(node path -> Cut for every param node that survives, the pruned config), from the masks alone: what
    `prune` does to a whole tree and `plrd_jax.io.streaming.prune_streamed` to one tensor at a time."""
    shape = pruned_shape(masks, config)
    z = _check_masks(masks, config)
    L, H, KV, hd = config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim_
    group = H // KV
    z_hidden = z.get("z_hidden")
    h_rows = _kept(z_hidden) if z_hidden is not None else None
    h_scale = z_hidden[h_rows] if z_hidden is not None else None
    layers = _kept(z["z_layer"]) if "z_layer" in z else np.arange(L)

    cuts = {("embed",): Cut(("embed",), cols=h_rows, col_scale=h_scale)}
    linears = {}
    for new, i in enumerate(layers):
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
        old, now = f"layers_{i}", f"layers_{new}"
        for norm in ("attn_norm", "mlp_norm"):
            cuts[(old, norm)] = Cut((now, norm), cols=h_rows, col_scale=h_scale)
        for block, name, cut in (
                ("attn", "q", dict(rows=h_rows, cols=q_cols)),
                ("attn", "k", dict(rows=h_rows, cols=kv_cols)),
                ("attn", "v", dict(rows=h_rows, cols=kv_cols)),
                ("attn", "o", dict(rows=q_cols, cols=h_rows, row_scale=o_scale, col_scale=out_scale)),
                ("mlp", "gate", dict(rows=h_rows, cols=inter)),
                ("mlp", "up", dict(rows=h_rows, cols=inter, col_scale=int_z[inter])),
                ("mlp", "down", dict(rows=inter, cols=h_rows, col_scale=out_scale))):
            cuts[(old, block, name)] = Cut((now, block, name), **cut)
            spec = config.linear(f"{old}/{block}/{name}")
            if spec.kind != "dense":
                linears[f"{now}/{block}/{name}"] = spec
    # The final norm takes z_hidden in only when the LM head is untied (a tied table already holds it).
    cuts[("final_norm",)] = Cut(("final_norm",), cols=h_rows, col_scale=None if config.tie_embeddings else h_scale)
    if not config.tie_embeddings:
        cuts[("lm_head",)] = Cut(("lm_head",), rows=h_rows)
        if config.linear("lm_head").kind != "dense":
            linears["lm_head"] = config.linear("lm_head")
    new_config = config.replace(**shape, head_dim=hd, linears=())
    return cuts, new_config.with_linears(linears)


def prune(params, config: ModelConfig, masks: dict) -> tuple[dict, ModelConfig]:
    """(params, config) of the smaller dense-shaped model equal in function to `config` run with `masks`.

    masks: any of z_layer [L], z_head [L, H], z_int [L, m], z_hidden [d] (a missing one keeps everything).
    The new config states head_dim explicitly and keeps each surviving matrix's LinearSpec.
    """
    cuts, new_config = prune_cuts(config, masks)
    out: dict = {}
    for old, cut in cuts.items():
        node = params
        for key in old:
            node = node[key]
        target = out
        for key in cut.path:
            target = target.setdefault(key, {})
        for leaf, x in node.items():
            target[leaf] = apply_cut(leaf, x, cut)
    return out, new_config
