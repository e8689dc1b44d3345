"""7B-scale transforms with bounded host memory: a member written into the family store matrix by matrix.

    factorize_streamed(hf_dir, plan, family_dir)       dense HF safetensors (sharded or not) -> low-rank member
    reduce_streamed(family_dir, member, plan)          a stored member -> a lower-rank member
    prune_streamed(hf_dir, masks, family_dir)          dense HF safetensors -> structurally pruned member

Each tensor is read alone (from the safetensors file that holds it, at its byte offset), transformed by the
library's own transforms (`svd_factors`, `reduce_factors`, or any `(K, r) -> (A, B)`), and added to the new
member's checkpoint with an Orbax partial save; the checkpoint is finalized and moved into the store as one
step at the end. Tensors copied unchanged keep their stored dtype when the member's dtype holds it exactly
(float16 / bfloat16 in a float32 member): restoring casts them, and the copy costs half the memory. Host memory therefore holds one source tensor, its float32 copy and its factorization at a
time: for LLaMA-2-7B the peak stays below two float32 copies of the largest matrix (the 32000 × 4096
embedding) plus the interpreter's fixed overhead, whatever the layer count.

Everything that can be checked without reading weights is checked first (config, index, every shard present,
every tensor present with the shape the config implies, ranks), so a broken checkpoint fails in a second.
On an accelerator whose devices hold the whole model, `transform_sharded` runs a transform under `jax.jit`
on device-resident, sharded params instead.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.nn.model import abstract_params
from plrd_jax.io.hf import dtype_name, hf_layout
from plrd_jax.transforms.calibrate import MatrixStats
from plrd_jax.transforms.decompositions import (Decomposition, DecompositionError, as_decomposition, check_stats,
                                                decompose, describe_scaling, scaling_report, truncate)
from plrd_jax.transforms.factorize import reduce_factors, svd_factors
from plrd_jax.transforms.plan import PlanError, RankPlan, check_ranks, resolve_ranks
from plrd_jax.transforms.prune import apply_cut, prune_cuts
from plrd_jax.io.checkpoint_reader import ST_DTYPES, open_checkpoint

FactorFn = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]  # (K (d_in, d_out), r) -> (A, B)
Progress = Callable[[dict[str, Any]], None]


# ---- shapes without weights -----------------------------------------------------------------------------
def streamed_ranks(config: ModelConfig, plan: RankPlan | Mapping[str, int]) -> dict[str, int]:
    """path -> rank for a plan that follows from shapes alone (rank, fraction, budget) or a ranks dict."""
    if isinstance(plan, Mapping):
        return dict(plan)
    if plan.energy is not None:
        raise PlanError("an energy plan needs every matrix's singular values before the first one is written; "
                        "stream with a rank, fraction or budget plan, or pass a ranks dict")
    return resolve_ranks(abstract_params(config), plan)


def member_config(config: ModelConfig, ranks: Mapping[str, int], dtype=None) -> ModelConfig:
    new = config.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
    if dtype is not None:
        name = dtype_name(dtype)
        new = new.replace(param_dtype=name, dtype=name)
    return new


def exact_in(stored, target) -> bool:
    """Every value of dtype `stored` is exactly a value of dtype `target` (so it can stay stored as it is and
    be cast on restore): the same dtype, or float16 / bfloat16 into float32."""
    stored, target = np.dtype(stored), np.dtype(target)
    return stored == target or (target == np.float32 and stored in (np.float16, np.dtype(ml_dtypes.bfloat16)))


# ---- writing a member into the family store, one matrix at a time -------------------------------------------
def _nested(keys: tuple[str, ...], value) -> dict:
    for key in reversed(keys):
        value = {key: value}
    return value


class MemberWriter:
    """Adds params to a new member's checkpoint piece by piece (Orbax partial saves), then commits it to the
    family store as step `step` with `metadata`. The store sees nothing until `commit`."""

    def __init__(self, family_dir: str | os.PathLike, step: int):
        from plrd_jax.io.store import FamilyStore, StoreError

        self.family_dir = Path(family_dir).absolute()
        self.family_dir.mkdir(parents=True, exist_ok=True)
        self.store = FamilyStore(self.family_dir)
        if step in self.store.steps():
            raise StoreError(f"{self.family_dir} already holds step {step}")
        self.step = step
        self.staging = self.family_dir / f".streaming-{step}"
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.family_dir / f".streaming-{step}.partial_save", ignore_errors=True)
        self.count = 0

    def add(self, keys: tuple[str, ...], value) -> None:
        """Write one array (uncompressed: Orbax then holds one encoded copy of it while writing, not two)."""
        from orbax.checkpoint import v1 as ocp

        context = ocp.Context()
        context.array.saving.use_compression = False
        with context:
            ocp.partial.save(self.staging / "params", _nested(keys, value))
        self.count += int(np.prod(value.shape))

    def commit(self, metadata: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp
        from orbax.checkpoint import v1 as ocp_v1

        ocp_v1.partial.finalize(self.staging / "params")
        # The finalized checkpoint holds the param tree in its one checkpointable subdirectory.
        trees = [d for d in (self.staging / "params").iterdir() if (d / "_METADATA").is_file()]
        if len(trees) != 1:
            raise RuntimeError(f"expected one pytree checkpoint in {self.staging / 'params'}, found {len(trees)}")
        self.store.manager.save(self.step, args=ocp.args.Composite(metadata=ocp.args.JsonSave(metadata)),
                                force=True)
        self.store.manager.wait_until_finished()
        trees[0].rename(self.family_dir / str(self.step) / "params")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.store.close()

    def commit_member(self, member: int, name: str, method: str, parent, config: ModelConfig, parent_count: int,
                      **extra) -> dict[str, Any]:
        """`commit` with the metadata of a member made from the HF checkpoint `parent` (untrained); returns it."""
        metadata = {"member": member, "name": name, "method": method, "parent": str(parent),
                    "config": config.to_dict(), "params": self.count, "compression": self.count / parent_count,
                    "tokens": 0, "step": self.step, "final": True, **extra}
        self.commit(metadata)
        return metadata


def _next_member(family_dir) -> tuple[int, int]:
    """(step, member index) for a new member appended to a (possibly new) family store."""
    from plrd_jax.io.store import FamilyStore

    if not Path(family_dir).is_dir():
        return 0, 0
    store = FamilyStore(family_dir, read_only=True)
    steps = store.steps()
    return (max(steps) + 1 if steps else 0), len(store.members())


def _start_member(family_dir, config: ModelConfig) -> tuple[MemberWriter, int, dict, int]:
    """(writer, member index, HF layout, parent param count) for a new member made from an HF checkpoint."""
    step, member = _next_member(family_dir)
    layout = hf_layout(config)
    return MemberWriter(family_dir, step), member, layout, sum(int(np.prod(shape)) for _, shape, _ in layout.values())


def _host(x) -> np.ndarray:
    return np.asarray(x)


def factorize_streamed(hf_dir: str | os.PathLike, plan: RankPlan | Mapping[str, int],
                       family_dir: str | os.PathLike, *, name: str | None = None, dtype=None,
                       factor_fn: FactorFn = svd_factors, decomposition=None,
                       stats: Mapping[str, MatrixStats] | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    """A low-rank member of the dense HF checkpoint at `hf_dir`, written into the family store `family_dir`.

    Every matrix K the plan selects becomes A, B = factor_fn(K, r) (default: the balanced truncated SVD);
    everything else is copied. Params are stored in `dtype` (default float32). progress(info) is called after
    each tensor with {"tensor", "layer", "done", "total"} (and "scaling" for a decomposition).
    decomposition ("whitened", "asvd", ... or a `Decomposition`) with stats (path -> `MatrixStats`, e.g.
    `plrd_jax.io.stats.load_stats`, whose Gram matrices are paged in one at a time): the method's rank-r
    factors instead of factor_fn, each matrix's statistics taken to the host only while it is decomposed. The
    metadata's "decomposition_report" then counts the input scalings used and names every matrix whose
    whitening fell back (damped Cholesky or eigh, `describe_scaling`). Returns the member's metadata.
    """
    source = open_checkpoint(hf_dir, dtype)
    config = source.config
    ranks = streamed_ranks(config, plan)
    check_ranks(abstract_params(config), ranks)
    decomposition = None if decomposition is None else as_decomposition(decomposition)
    if decomposition is not None:
        _check_streamed_stats(config, ranks, decomposition, stats)
    new_config = member_config(config, ranks)
    scalings: dict[str, str] = {}
    writer, member, layout, parent_count = _start_member(family_dir, config)
    param_dtype = np.dtype(config.jnp_param_dtype)
    for done, hf_name in enumerate(layout, start=1):
        path = "/".join(layout[hf_name][0][:-1])
        factorized = layout[hf_name][0][-1] == "kernel" and path in ranks
        stored = ST_DTYPES[source.tensors[hf_name].dtype]
        # Copied tensors keep their stored dtype when that is exact (restored into the member's dtype).
        keys, array = source.read(hf_name, "stored" if not factorized and exact_in(stored, param_dtype) else None)
        if factorized:
            kernel = jnp.asarray(array)
            del array
            if decomposition is None:
                a, b = factor_fn(kernel, ranks[path])
            else:
                a, b, scalings[path] = _decomposed(kernel, ranks[path], decomposition, stats, path)
            del kernel
            writer.add((*keys[:-1], "A"), _host(a))
            writer.add((*keys[:-1], "B"), _host(b))
            del a, b
        else:
            writer.add(keys, array)
            del array
        if progress is not None:
            info = {"tensor": "/".join(keys), "layer": keys[0], "done": done, "total": len(layout)}
            progress(info if path not in scalings else {**info, "scaling": scalings[path]})
    extra = {} if decomposition is None else {"decomposition_report": scaling_report(decomposition, scalings)}
    return writer.commit_member(member, name or f"streamed-{member}", "plrd-streamed", hf_dir, new_config,
                                parent_count, ranks=ranks, **extra)


def _check_streamed_stats(config: ModelConfig, ranks: Mapping[str, int], decomposition: Decomposition,
                          stats: Mapping[str, MatrixStats] | None) -> None:
    """Every factorized matrix has statistics of its input width (`check_stats` too), before any is written."""
    if not decomposition.needs_stats:
        return
    if stats is None:
        raise DecompositionError(f"decomposition {decomposition.method!r} needs calibration statistics "
                                 "(stats=, e.g. plrd_jax.io.stats.load_stats(DIR))")
    missing = [p for p in ranks if p not in stats]
    if missing:
        raise DecompositionError(f"no calibration statistics for {len(missing)} matrices, e.g. {missing[0]!r}")
    for p in ranks:
        d_in = config.matrix_shape(p)[0]
        if tuple(stats[p].xtx.shape) != (d_in, d_in):
            raise DecompositionError(f"statistics of {p!r} are for inputs of width {stats[p].xtx.shape[0]}, "
                                     f"its kernel takes {d_in}")
        check_stats(decomposition, stats[p], p)  # e.g. Fisher rows present: reads one vector, not the Gram


def _decomposed(kernel: jax.Array, r: int, decomposition: Decomposition, stats, path: str):
    """(A, B, scaling description) of one matrix, its statistics on the host only for this call."""
    matrix_stats = None
    if decomposition.needs_stats:
        matrix_stats = MatrixStats(*(jnp.asarray(np.asarray(x, np.float32)) for x in stats[path]))
    spectrum = decompose(kernel, decomposition, matrix_stats)
    a, b = truncate(spectrum, r, kernel.dtype)
    return a, b, describe_scaling(spectrum.scaling)


def _restore_subtree(params_dir: Path, subtree) -> dict:
    """Only the leaves of `subtree` (ShapeDtypeStructs) from a stored param tree, as numpy arrays."""
    import orbax.checkpoint as ocp

    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), subtree)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=subtree, restore_args=restore_args, partial_restore=True))


def _leaves_by_matrix(abstract) -> Iterator[tuple[tuple[str, ...], dict]]:
    """(keys, node) for every matrix node (dict with kernel or A, B) and every other leaf, in tree order."""
    def walk(node, keys):
        if isinstance(node, Mapping) and ("kernel" in node or "A" in node):
            yield keys, node
        elif isinstance(node, Mapping):
            for key, child in node.items():
                yield from walk(child, (*keys, key))
        else:
            yield keys, node
    yield from walk(abstract, ())


def reduce_streamed(family_dir: str | os.PathLike, member: str, plan: RankPlan | Mapping[str, int], *,
                    name: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """A lower-rank member made from stored member `member` (index or name) of the same family store, reading
    and writing one matrix at a time: factorized matrices by `reduce_factors` (A B is never formed), dense
    ones the plan selects by `svd_factors`. Returns the new member's metadata."""
    from plrd_jax.io.store import FamilyStore

    store = FamilyStore(family_dir, read_only=True)
    meta = store.find_member(member)
    config = ModelConfig.from_dict(meta["config"])
    abstract = abstract_params(config)
    ranks = streamed_ranks(config, plan)
    check_ranks(abstract, ranks)
    params_dir = Path(store.directory) / str(meta["step"]) / "params"
    step, index = _next_member(family_dir)
    writer = MemberWriter(family_dir, step)
    nodes = list(_leaves_by_matrix(abstract))
    for done, (keys, node) in enumerate(nodes, start=1):
        path = "/".join(keys)
        values = _restore_subtree(params_dir, _nested(keys, node))
        for key in keys:
            values = values[key]
        if isinstance(node, Mapping) and path in ranks:
            r = ranks[path]
            dtype = config.jnp_param_dtype  # leaves may be stored narrower (see `exact_in`)
            if "kernel" in values:
                a, b = svd_factors(jnp.asarray(values.pop("kernel"), dtype), r)
            else:
                a, b = reduce_factors(jnp.asarray(values.pop("A"), dtype), jnp.asarray(values.pop("B"), dtype), r)
            values = {**values, "A": _host(a), "B": _host(b)}
            del a, b
        if isinstance(values, Mapping):
            for key, value in values.items():
                writer.add((*keys, key), value)
        else:
            writer.add(keys, values)
        del values
        if progress is not None:
            progress({"tensor": path, "layer": keys[0], "done": done, "total": len(nodes)})
    new_config = member_config(config, {**{p: s.rank for p, s in config.linears if s.kind == "lowrank"}, **ranks})
    metadata = {"member": index, "name": name or f"streamed-{index}", "method": "plrd-streamed",
                "parent": meta.get("parent"), "source_member": meta["member"], "config": new_config.to_dict(),
                "params": writer.count, "compression": meta.get("compression", 1.0) * writer.count / meta["params"],
                "tokens": 0, "step": step, "final": True, "ranks": ranks}
    writer.commit(metadata)
    return metadata


def prune_streamed(hf_dir: str | os.PathLike, masks: Mapping[str, Any], family_dir: str | os.PathLike, *,
                   name: str | None = None, dtype=None, progress: Progress | None = None) -> dict[str, Any]:
    """The dense HF checkpoint at `hf_dir` pruned by fixed `masks` (z_layer, z_head, z_int, z_hidden; see
    `plrd_jax.transforms.prune`) into a new member of the family store `family_dir`, one tensor at a time:
    the same params as `prune` on the whole model. The masks are checked against the checkpoint's config
    (PruneError) before any tensor is read. Returns the member's metadata."""
    source = open_checkpoint(hf_dir, dtype)
    config = source.config
    cuts, new_config = prune_cuts(config, dict(masks))
    writer, member, layout, parent_count = _start_member(family_dir, config)
    param_dtype = np.dtype(config.jnp_param_dtype)
    for done, hf_name in enumerate(layout, start=1):
        keys = layout[hf_name][0]
        cut = cuts.get(keys[:-1])
        if cut is not None:  # else: a dropped layer's tensor, never read
            # Select in the stored dtype, then widen and scale only what is kept: the least memory.
            _, array = source.read(hf_name, "stored")
            array = apply_cut(keys[-1], array, dataclasses.replace(cut, row_scale=None, col_scale=None))
            if cut.row_scale is not None or cut.col_scale is not None:
                array = apply_cut(keys[-1], array.astype(param_dtype), dataclasses.replace(cut, rows=None, cols=None),
                                  inplace=True)
            elif not exact_in(array.dtype, param_dtype):
                array = array.astype(param_dtype)
            writer.add((*cut.path, keys[-1]), np.ascontiguousarray(array))
            del array
        if progress is not None:
            progress({"tensor": "/".join(keys), "layer": keys[0], "done": done, "total": len(layout)})
    shape = {k: getattr(new_config, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                 "intermediate_size")}
    return writer.commit_member(member, name or f"pruned-{member}", "prune-streamed", hf_dir, new_config,
                                parent_count, shape=shape)


# ---- on the accelerator: the same transforms on device-resident, sharded params ------------------------------
def transform_sharded(transform, params, ranks: Mapping[str, int], config: ModelConfig, mesh):
    """`transform(params, ranks)` (factorize or reduce_rank) under jit, params and result sharded on `mesh` by
    the logical-axis rules. Returns (params, config)."""
    from plrd_jax.nn.sharding import param_shardings

    new_config = member_config(config, {**{p: s.rank for p, s in config.linears if s.kind == "lowrank"},
                                        **dict(ranks)})
    out_shapes = jax.eval_shape(lambda p: transform(p, dict(ranks))[0], params)
    fn = jax.jit(lambda p: transform(p, dict(ranks))[0], in_shardings=(param_shardings(params, mesh),),
                 out_shardings=param_shardings(out_shapes, mesh))
    return fn(params), new_config
