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

How: `prune` is three steps. (1) Layer removal and renumbering (z_layer) is a restructuring of the tree, not a
slice of an axis, so it stays here. (2) All slicing goes through the generic unit description
(plrd_jax/transforms/units.py): `decoder_units(config, kept layers)` with the keep masks `decoder_keep` derives
from the z masks (kv head g kept iff its group keeps a query head). (3) Folding the kept mask values z into the
weights is a scale, not a slice, so it stays here: the `Cut` scales of `prune_cuts`, applied to what is kept.
`prune_cuts` / `apply_cut` remain the per-tensor form of the same result (streamed pruning).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.masks import mask_shapes
from plrd_jax.nn.layout import stack_layers, stores_stacked, unstack_layers
from plrd_jax.transforms.units import PruneError, decoder_units, prune_units

__all__ = ["Cut", "PruneError", "apply_cut", "decoder_keep", "prune", "prune_cuts", "pruned_shape"]


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


def decoder_keep(config: ModelConfig, masks: dict) -> dict[str, np.ndarray]:
    """The keep masks of `decoder_units(config)` (plrd_jax/transforms/units.py) that the z masks imply, for the
    layers they keep (a dropped layer gets none): hidden = z_hidden ≠ 0; per kept layer i heads = z_head[i] ≠ 0,
    kv_heads[g] = any(heads of group g) and channels = z_int[i] ≠ 0. A missing z mask keeps its units."""
    z = _check_masks(masks, config)
    keep = {"hidden": z["z_hidden"] != 0} if "z_hidden" in z else {}
    for i in _kept_layers(z, config):
        if "z_head" in z:
            heads = z["z_head"][i] != 0
            keep[f"layers_{i}/heads"] = heads
            keep[f"layers_{i}/kv_heads"] = heads.reshape(config.num_kv_heads, -1).any(axis=1)
        if "z_int" in z:
            keep[f"layers_{i}/channels"] = z["z_int"][i] != 0
    return keep


def _kept_layers(z: dict[str, np.ndarray], config: ModelConfig) -> np.ndarray:
    return _kept(z["z_layer"]) if "z_layer" in z else np.arange(config.num_layers)


def prune(params, config: ModelConfig, masks: dict) -> tuple[dict, ModelConfig]:
    """(params, config) of the smaller dense-shaped model equal in function to `config` run with `masks`.

    masks: any of z_layer [L], z_head [L, H], z_int [L, m], z_hidden [d] (a missing one keeps everything).
    The new config states head_dim explicitly and keeps each surviving matrix's LinearSpec. Layers are dropped
    here, the slicing is `prune_units(decoder_units(...), decoder_keep(...))` and the kept mask values are
    folded in by the cuts' scales (module docstring); the result equals applying each `Cut` whole.
    `params` in either layout; the result in the new config's (`nn.layout.stores_stacked`).
    """
    params = unstack_layers(params)  # masks and cuts address layers by index
    if not isinstance(config, ModelConfig) or "embed" not in params:
        raise PruneError("prune reads our decoder's masks and paths (a ModelConfig and its params); for any other "
                         "tree describe its units and call transforms.units.prune_units")
    cuts, new_config = prune_cuts(config, masks)  # checks the masks: the model-shape errors come first
    layers = _kept_layers(_check_masks(masks, config), config)
    kept = {f"layers_{i}" for i in layers}
    present = {key: node for key, node in params.items() if not key.startswith("layers_") or key in kept}
    sliced = prune_units(present, decoder_units(config, layers), decoder_keep(config, masks))
    out: dict = {}
    for old, cut in cuts.items():
        node = sliced
        for key in old:
            node = node[key]
        target = out
        for key in cut.path:
            target = target.setdefault(key, {})
        scale_only = dataclasses.replace(cut, rows=None, cols=None)
        for leaf, x in node.items():
            target[leaf] = apply_cut(leaf, x, scale_only)
    return (stack_layers(out, new_config) if stores_stacked(new_config) else out), new_config
