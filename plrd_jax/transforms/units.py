"""Generic structured pruning: a declarative description of coupled units, and the slicing it implies.

A structured unit is a set of entries that must go together for the pruned model to stay a valid, smaller
model of the same kind: MLP channel i is column i of gate and up and row i of down; attention head h is a
block of head_dim columns of q, k, v and the same rows of o. Pruning removes whole units, so the model
with unit i removed computes exactly what the original computes with unit i's contribution zeroed.

Here a unit is plain data, written by hand for any parameter tree (a foreign linen module, a MaxText-style
scanned stack) or generated for our decoder by `decoder_units(config)`:

  Slot(path, axis, size=1, stacked=False)   the leaf at `path` ("/"-joined keys; fnmatch glob allowed, `*`
                                            crosses "/") holds n·size entries along `axis`; entries
                                            [i·size, (i+1)·size) belong to unit i. A DenseGeneral kernel
                                            (d, heads, head_dim) is axis=1, size=1; a flat q kernel
                                            (d, heads·head_dim) is axis=1, size=head_dim.
                                            stacked: the leaf has a leading layer axis [L, ...] (scanned
                                            layers); `axis` still counts it, so it is >= 1.
  Unit(name, n, slots)                      n coupled units, each spanning every slot

`prune_units(params, units, keep)` takes keep = {unit name: mask [n]} (nonzero = kept; a unit without a mask
keeps everything) and slices every slot's leaf along its axis to the kept entries, in order:
kept(x) = take(x, ⋃_{i kept} [i·size, (i+1)·size), axis). A unit whose slots are all stacked may instead get a
per-layer mask [L, n]: layer l of each leaf keeps the entries of its own kept units. A stacked array must stay
rectangular, so every layer then keeps the same number of units.

Everything is checked before anything is sliced and every failure is a one-line `PruneError`. Masks must be
concrete (not traced): output shapes depend on their values. numpy leaves stay numpy, jax leaves stay jax.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.nn.config import MATRIX_KINDS, ModelConfig


class PruneError(ValueError):
    """Masks or unit descriptions that do not describe a valid smaller model."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """Leaf `path` (or glob) whose `axis` holds n·`size` entries, `size` consecutive ones per unit;
    stacked: a leading layer axis that a per-layer mask [L, n] indexes."""

    path: str
    axis: int
    size: int = 1
    stacked: bool = False

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise PruneError(f"slot {self.path!r} has size {self.size}; it must be a positive integer")


@dataclasses.dataclass(frozen=True)
class Unit:
    """`n` coupled units called `name`; unit i is entries [i·size, (i+1)·size) of every slot's leaf axis."""

    name: str
    n: int
    slots: tuple[Slot, ...]

    def __post_init__(self):
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise PruneError(f"unit {self.name!r} has n={self.n}; it must be a positive integer")
        if not self.slots:
            raise PruneError(f"unit {self.name!r} has no slots")


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(params) -> tuple[list[str], list, object]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return ["/".join(_key_str(k) for k in path) for path, _ in flat], [x for _, x in flat], treedef


def leaf_paths(params) -> list[str]:
    """The "/"-joined path of every leaf of `params`, in flattening order: what slot paths are matched to."""
    return _flat(params)[0]


def _matches(pattern: str, paths: list[str], index: dict[str, int]) -> list[int]:
    """Indices of the leaves whose path matches `pattern` (an exact path is a dict lookup, a glob a scan)."""
    if not any(c in pattern for c in "*?["):
        return [index[pattern]] if pattern in index else []
    return [i for i, p in enumerate(paths) if fnmatch.fnmatchcase(p, pattern)]


def _names(items, limit: int = 8) -> str:
    items = list(items)
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(repr(x) for x in items[:limit]) + more


def _check_mask(unit: Unit, mask) -> np.ndarray:
    """keep[unit.name] as a bool array [n] or [L, n], with at least one kept unit per row and, per layer, the
    same number kept (a stacked leaf must stay rectangular)."""
    mask = np.asarray(mask) != 0
    if mask.ndim not in (1, 2) or mask.shape[-1] != unit.n:
        raise PruneError(f"keep[{unit.name!r}] has shape {mask.shape}; unit {unit.name!r} has n={unit.n}, so it "
                         f"needs ({unit.n},) or (layers, {unit.n})")
    if mask.ndim == 2:
        unstacked = [s.path for s in unit.slots if not s.stacked]
        if unstacked:
            raise PruneError(f"keep[{unit.name!r}] is per layer {mask.shape} but slot {unstacked[0]!r} of unit "
                             f"{unit.name!r} is not stacked")
    counts = mask.reshape(-1, unit.n).sum(axis=1)
    if (counts == 0).any():
        where = f" in layer {int(np.argmin(counts))}" if mask.ndim == 2 else ""
        raise PruneError(f"keep[{unit.name!r}] removes every unit of {unit.name!r}{where}; keep at least one")
    if len(set(counts.tolist())) > 1:
        raise PruneError(f"keep[{unit.name!r}] keeps {counts.tolist()} units in its layers; a stacked leaf must stay "
                         "rectangular, so keep the same number in every layer")
    return mask


def _check_slot(unit: Unit, slot: Slot, path: str, shape: tuple[int, ...], mask) -> int:
    """The slot's axis in the leaf at `path` (normalized), after checking that it holds n·size entries."""
    if not -len(shape) <= slot.axis < len(shape):
        raise PruneError(f"slot axis {slot.axis} of unit {unit.name!r} is out of range for leaf {path!r} of shape "
                         f"{shape}")
    axis = slot.axis % len(shape)
    if slot.stacked and axis == 0:
        raise PruneError(f"slot {path!r} of unit {unit.name!r} is stacked, so axis 0 is its layer axis; the unit "
                         "axis must be >= 1")
    if shape[axis] != unit.n * slot.size:
        raise PruneError(f"leaf {path!r} axis {axis} has length {shape[axis]}; unit {unit.name!r} needs "
                         f"n·size = {unit.n}·{slot.size} = {unit.n * slot.size}")
    if mask is not None and mask.ndim == 2 and shape[0] != mask.shape[0]:
        raise PruneError(f"keep[{unit.name!r}] has {mask.shape[0]} layers but stacked leaf {path!r} has "
                         f"{shape[0]}")
    return axis


def _plan(paths: list[str], shapes: list[tuple[int, ...]], units: tuple[Unit, ...],
          keep: Mapping) -> dict[int, list[tuple[int, int, np.ndarray]]]:
    """Leaf index -> [(axis, size, bool mask), ...] for every leaf a masked unit slices; checks everything
    (unit names, masks, slot paths and lengths, one unit per leaf axis) first."""
    by_name: dict[str, Unit] = {}
    for unit in units:
        if unit.name in by_name:
            raise PruneError(f"unit name {unit.name!r} appears twice in the description")
        by_name[unit.name] = unit
    unknown = [name for name in keep if name not in by_name]
    if unknown:
        raise PruneError(f"keep names unknown unit {unknown[0]!r}; the units are {_names(by_name)}")
    masks = {name: _check_mask(by_name[name], m) for name, m in keep.items()}
    index = {p: i for i, p in enumerate(paths)}
    owner: dict[tuple[int, int], tuple[str, int]] = {}
    plan: dict[int, list[tuple[int, int, np.ndarray]]] = {}
    for unit in units:
        mask = masks.get(unit.name)
        for slot in unit.slots:
            hits = _matches(slot.path, paths, index)
            if not hits:
                raise PruneError(f"slot path {slot.path!r} of unit {unit.name!r} matches no leaf")
            for i in hits:
                axis = _check_slot(unit, slot, paths[i], shapes[i], mask)
                claim = owner.get((i, axis))
                if claim is not None and claim != (unit.name, slot.size):
                    raise PruneError(f"leaf {paths[i]!r} axis {axis} is sliced by unit {claim[0]!r} (size {claim[1]}) "
                                     f"and by unit {unit.name!r} (size {slot.size}); a leaf axis belongs to one unit")
                if claim is None:  # the same slot matched twice (two globs) slices once
                    owner[(i, axis)] = (unit.name, slot.size)
                    if mask is not None:
                        plan.setdefault(i, []).append((axis, slot.size, mask))
    return plan


def _slice(x, axis: int, size: int, mask: np.ndarray):
    """x with only the entries of kept units along `axis`: [n] mask -> take; [L, n] -> per layer along axis 0."""
    if mask.ndim == 1:
        index = (np.flatnonzero(mask)[:, None] * size + np.arange(size)).reshape(-1)
        return x.take(index, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, index, axis=axis)
    units = np.stack([np.flatnonzero(row) for row in mask])  # [L, k]: rectangular (checked)
    index = (units[..., None] * size + np.arange(size)).reshape(len(mask), -1)
    shape = [1] * x.ndim
    shape[0], shape[axis] = index.shape
    index = index.reshape(shape)
    take = np.take_along_axis if isinstance(x, np.ndarray) else jnp.take_along_axis
    return take(x, index, axis=axis)


def prune_units(params, units: tuple[Unit, ...] | list[Unit], keep: Mapping):
    """`params` with every slot of every unit in `keep` sliced to its kept units (module docstring); all other
    leaves are returned as they are (the same objects). Pure: no config, any pytree of arrays.

    keep: unit name -> mask [n] (or [L, n] for a unit whose slots are all stacked); nonzero entries are kept.
    Raises PruneError (one line) for an unknown unit name, a mask of the wrong length, a slot path that matches
    no leaf, a leaf axis whose length is not n·size, a leaf axis claimed by two units, a mask keeping no unit,
    and a per-layer mask keeping different numbers of units in different layers.
    """
    paths, leaves, treedef = _flat(params)
    plan = _plan(paths, [tuple(np.shape(x)) for x in leaves], tuple(units), keep)
    for i, cuts in plan.items():
        for axis, size, mask in cuts:
            leaves[i] = _slice(leaves[i], axis, size, mask)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---- our decoder --------------------------------------------------------------------------------
def _matrix_slots(config: ModelConfig, path: str, side: str, size: int = 1) -> list[Slot]:
    """Slots of matrix `path` (y = x K): its input side ("in": rows of kernel or A) or output side ("out":
    columns of kernel or B, and the bias when it has one). A factorized matrix keeps its rank."""
    spec = config.linear(path)
    if spec.kind == "sltrain":
        raise PruneError(f"{path} is an SLTrain matrix (fixed sparse support); densify it before pruning")
    factor = "kernel" if spec.kind == "dense" else ("A" if side == "in" else "B")
    slots = [Slot(f"{path}/{factor}", 0 if side == "in" else 1, size)]
    name = path.rsplit("/", 1)[-1]
    if side == "out" and config.qkv_bias and name in ("q", "k", "v"):
        slots.append(Slot(f"{path}/bias", 0, size))
    return slots


def decoder_units(config: ModelConfig, layers=None) -> tuple[Unit, ...]:
    """The units of our decoder (`plrd_jax.nn.model.Decoder`), from its config:

      "hidden"             n = d: column of the embedding, entry of every norm scale, row of q, k, v, gate, up
                           (and of an untied lm_head), column of o and down
      "layers_{i}/heads"   n = H query heads: head_dim columns of q (and its bias), head_dim rows of o
      "layers_{i}/kv_heads" n = KV kv heads: head_dim columns of k and v (and their biases)
      "layers_{i}/channels" n = m: column of gate and up, row of down

    layers: the layer indices present in the tree (default all; `prune` drops layers before slicing).
    A dropped kv head must have no kept query head in its group (`prune` derives kv_heads from z_head).
    Raises PruneError for an SLTrain matrix, whose fixed sparse support no unit describes.
    """
    layers = range(config.num_layers) if layers is None else layers
    hd = config.head_dim_
    hidden = [Slot("embed/embedding", 1), Slot("final_norm/scale", 0)]
    per_layer = []
    for i in layers:
        p = f"layers_{i}"
        hidden += [Slot(f"{p}/attn_norm/scale", 0), Slot(f"{p}/mlp_norm/scale", 0)]
        for name, block in MATRIX_KINDS.items():
            side = "out" if name in ("o", "down") else "in"
            hidden += _matrix_slots(config, f"{p}/{block}/{name}", side)
        per_layer += [
            Unit(f"{p}/heads", config.num_heads, tuple(
                _matrix_slots(config, f"{p}/attn/q", "out", hd) + _matrix_slots(config, f"{p}/attn/o", "in", hd))),
            Unit(f"{p}/kv_heads", config.num_kv_heads, tuple(
                _matrix_slots(config, f"{p}/attn/k", "out", hd) + _matrix_slots(config, f"{p}/attn/v", "out", hd))),
            Unit(f"{p}/channels", config.intermediate_size, tuple(
                _matrix_slots(config, f"{p}/mlp/gate", "out") + _matrix_slots(config, f"{p}/mlp/up", "out")
                + _matrix_slots(config, f"{p}/mlp/down", "in")))]
    if not config.tie_embeddings:
        hidden += _matrix_slots(config, "lm_head", "in")
    return (Unit("hidden", config.hidden_size, tuple(hidden)), *per_layer)
