"""Device mesh and sharding as data: logical axis names per parameter, a rules table mapping them to mesh axes.

Mesh axes ("data", "fsdp", "tensor"): the batch is split over data × fsdp, parameters over fsdp (their
"embed" dimension, ZeRO-3 style) and tensor (their "mlp" / "heads" / "vocab" dimension, Megatron style).
Params stay plain nested dicts; their logical axes are derived from the path and shape:

  embed/embedding                 (vocab, embed)
  .../{q,k,v,gate,up}/kernel      (embed, heads | kv_heads | mlp)          column-parallel
  .../{o,down}/kernel             (heads | mlp, embed)                      row-parallel
  lm_head/kernel                  (embed, vocab)
  A, B of a column-parallel       A (embed, rank), B (rank, heads | kv_heads | mlp | vocab)
  A, B of a row-parallel          A (heads | mlp, rank), B (rank, embed)
  bias                            (heads | kv_heads,)
  .../scale (norms)               (norm,)
  values, indices (sltrain)       (sparse,)
  anything else                   replicated
  layers/...  (stacked layout)    a leading layer axis, never split, before the axes above

Activations: the residual stream (the embedding's and each block's output, (B, T, d)) is split over the batch
axes inside `shard_activations(mesh)`, so the partitioner never has to guess a layout for it.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from plrd_jax.nn.layout import STACK

from plrd_jax.nn.model import Block

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "rank": None,
    "norm": None,
    "sparse": None,
}

# Matrix name -> (logical name of d_in, logical name of d_out).
MATRIX_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"), "lm_head": ("embed", "vocab"),
}


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default all); one entry of `shape` may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} needs one size per axis {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive, at most one may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)}: {len(devices)} devices are not a multiple of {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} has {math.prod(shape)} devices but there are "
                         f"{len(devices)} (jax.device_count() = {jax.device_count()}); use -1 for 'the rest'")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at '/'-joined `path` (e.g. "layers_0/mlp/up/A") with `shape`."""
    keys = path.split("/")
    leaf, owner = keys[-1], (keys[-2] if len(keys) > 1 else "")
    axes: tuple[str | None, ...] | None = None
    if keys[-2:] == ["embed", "embedding"]:
        axes = ("vocab", "embed")
    elif leaf == "scale":
        axes = ("norm",)
    elif owner in MATRIX_AXES:
        d_in, d_out = MATRIX_AXES[owner]
        axes = {"kernel": (d_in, d_out), "A": (d_in, "rank"), "B": ("rank", d_out), "bias": (d_out,),
                "values": ("sparse",), "indices": ("sparse",)}.get(leaf)
    if axes is None or len(axes) != len(shape):
        return (None,) * len(shape)
    return axes


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                   rules: Mapping = RULES) -> PartitionSpec:
    """Mesh axes for each dimension by `rules`, dropping a mesh axis that does not divide the dimension
    (or that an earlier dimension already uses), so odd sizes (9 heads × 64, vocab 49153) stay valid."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept, divisor = [], 1
        for axis in targets:
            n = mesh_shape[axis]
            if axis not in used and size % (divisor * n) == 0:
                kept.append(axis)
                divisor *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _path_str(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def fsdp_fallback(spec: PartitionSpec, shape: Sequence[int], mesh_shape: Mapping[str, int],
                  axis: str = "fsdp") -> PartitionSpec:
    """ZeRO-3 for every matrix: a 2-D-or-more parameter that no rule splits over `axis` (a factor B (rank, mlp)
    when the tensor axis is 1, a factor A (mlp, rank) of a row-parallel matrix) gets `axis` on its largest
    dimension that divides, so that no device holds a whole factor."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries for a in ((e,) if isinstance(e, str) else (e or ()))}
    n = mesh_shape.get(axis, 1)
    if n == 1 or axis in used or len(shape) < 2:
        return spec
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
        current = entries[dim]
        targets = (current,) if isinstance(current, str) else tuple(current or ())
        divisor = math.prod(mesh_shape[a] for a in targets)
        if shape[dim] % (divisor * n) == 0:
            entries[dim] = axis if not targets else (*targets, axis)
            return PartitionSpec(*entries)
    return spec


def param_shardings(params, mesh: Mesh, rules: Mapping = RULES):
    """Pytree of `NamedSharding` matching `params` (arrays or `jax.ShapeDtypeStruct`s): the rules' partitioning,
    plus `fsdp_fallback` for matrices the rules leave whole on every fsdp device. In the stacked layout each
    layer's slice is split so, the layer axis never."""
    def sharding(key_path, x):
        path = _path_str(key_path)
        lead = 1 if path.split("/", 1)[0] == STACK else 0
        shape = x.shape[lead:]
        spec = partition_spec(logical_axes(path, shape), shape, mesh.shape, rules)
        return NamedSharding(mesh, PartitionSpec(*([None] * lead), *fsdp_fallback(spec, shape, mesh.shape)))
    return jax.tree_util.tree_map_with_path(sharding, params)


def batch_sharding(mesh: Mesh, leading_dims: int = 0, rules: Mapping = RULES) -> NamedSharding:
    """Sharding of a token batch whose batch dimension follows `leading_dims` unsplit ones:
    (B, T) with leading_dims=0, (accum, B, T) with leading_dims=1. B must divide by the batch mesh axes."""
    target = rules["batch"]
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), target))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())



def shard_activations(mesh: Mesh, rules: Mapping = RULES):
    """Context manager: inside it, a traced model's residual stream (B, T, d) — the output of the embedding
    and of every block — is constrained to `batch_sharding(mesh)` (use it around `Decoder.apply` under jit)."""
    sharding = batch_sharding(mesh, rules=rules)

    def constrain(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(context.module, nn.Embed):
            return jax.lax.with_sharding_constraint(out, sharding)
        if isinstance(context.module, Block):
            return jax.lax.with_sharding_constraint(out[0], sharding), out[1]
        return out
    return nn.intercept_methods(constrain)
