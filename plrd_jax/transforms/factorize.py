"""Factorize, reduce the rank of, and densify the matrices of a param tree.

Pure functions in the style of optax: params (and a plan) in, new params and config out, nothing hidden.
They work on any nested dict of arrays (see `plan.py` for what a matrix is) and under `jax.jit` when the
ranks are static: a `RankPlan` whose ranks follow from shapes (rank, fraction, budget) or a resolved ranks
dict. An `energy` plan needs singular values, so resolve it with `resolve_ranks` outside jit.

Linear algebra runs in float32 (or wider, if the params are) with jnp, on the device holding the params and
inside jit; its backward error (~1e-7 · ‖K‖) is far below the rounding of a bfloat16 param and on par with
a float32 one, and the factors are cast back to the param dtype. Matmuls ask for "highest" precision so that
TPU/GPU do not round them through bfloat16/TF32.

A decomposition other than plain "svd" (`decompositions.py`: whitened, asvd, fisher) needs calibration
statistics `stats`, a dict path -> `plrd_jax.transforms.calibrate.MatrixStats`; it is chosen by the plan's
`decomposition` field or the `decomposition` argument, which wins. A stacked node (a scanned (L, d_in, d_out)
kernel) takes statistics with the same leading axes (xtx (L, d_in, d_in), `slice_stats`), and each slice is
decomposed with its own.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.transforms.decompositions import (Decomposition, as_decomposition, check_stats, decomposed_factors,
                                                reduced_factors, truncate)
from plrd_jax.transforms.plan import PlanError, RankPlan, check_ranks, resolve_ranks, singular_values
from plrd_jax.transforms.sharded import gram_factors, gram_reduce, place_like
from plrd_jax.transforms.views import (Matrix, MatrixView, batched, factor_stacks, find_matrices, kernel_stack,
                                      write_factors, write_kernel)

__all__ = ["svd_factors", "reduce_factors", "singular_values", "factorize", "reduce_rank", "densify"]


def _matmul(x, y):
    return jnp.matmul(x, y, precision="highest")


def _compute_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def svd_factors(kernel: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """K (d_in, d_out) ≈ A B, A = U_r √Σ_r (d_in, r), B = √Σ_r V_rᵀ (r, d_out): the truncated SVD, balanced."""
    u, s, vt = jnp.linalg.svd(kernel.astype(_compute_dtype(kernel)), full_matrices=False)
    root = jnp.sqrt(s[:r])
    return (u[:, :r] * root).astype(kernel.dtype), (root[:, None] * vt[:r]).astype(kernel.dtype)


def reduce_factors(a: jax.Array, b: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """A (d_in, k), B (k, d_out) -> A' (d_in, r), B' (r, d_out): the truncated SVD of A B, never forming A B.

    A = Q_A R_A, Bᵀ = Q_B R_B, R_A R_Bᵀ = U Σ Vᵀ (k × k), so A B = (Q_A U) Σ (Q_B V)ᵀ;
    A' = Q_A U_r √Σ_r, B' = √Σ_r V_rᵀ Q_Bᵀ.
    """
    dtype = _compute_dtype(a)
    q_a, r_a = jnp.linalg.qr(a.astype(dtype))
    q_b, r_b = jnp.linalg.qr(b.T.astype(dtype))
    u, s, vt = jnp.linalg.svd(_matmul(r_a, r_b.T), full_matrices=False)
    root = jnp.sqrt(s[:r])
    return (_matmul(q_a, u[:, :r] * root).astype(a.dtype),
            _matmul(root[:, None] * vt[:r], q_b.T).astype(b.dtype))


def _map_matrices(params, fn, matrices: Mapping[str, Matrix], path=""):
    """A copy of the tree with every matrix node at a path of `matrices` replaced by fn(path, node)."""
    if path in matrices:
        return fn(path, params)
    if isinstance(params, Mapping):
        return {k: _map_matrices(v, fn, matrices, f"{path}/{k}" if path else str(k)) for k, v in params.items()}
    return params


def _check_kinds(config: ModelConfig | None, paths):
    for path in paths if config is not None else ():
        kind = config.linear(path).kind
        if kind not in ("dense", "lowrank"):
            raise PlanError(f"{path} is a {kind} linear; only dense and lowrank matrices can be re-ranked")


def _decomposition(plan, decomposition, stats, paths) -> Decomposition:
    """The decomposition asked for (argument, else the plan's, else plain svd), its statistics checked."""
    if decomposition is None and isinstance(plan, RankPlan):
        decomposition = plan.decomposition
    decomposition = as_decomposition(decomposition)
    for path in paths if decomposition.needs_stats else ():
        check_stats(decomposition, None if stats is None else stats.get(path), path)
    return decomposition


def _views(plan, views) -> dict | None:
    return dict(views) if views is not None else (dict(plan.views) if isinstance(plan, RankPlan) else None)


def slice_stats(stats, count: int, path: str = "this matrix") -> list:
    """The `MatrixStats` of each of a stack's `count` slices: every field with the stack's leading axes (any
    shape of `count` entries) before its own, e.g. xtx (L, d_in, d_in) for a scanned (L, d_in, d_out) kernel;
    plain (d_in, d_in) statistics serve a single matrix only. tokens may be one number for all slices."""
    xtx = jnp.asarray(stats.xtx)
    d_in = xtx.shape[-1]
    if count > 1 and (xtx.ndim < 3 or math.prod(xtx.shape[:-2]) != count):
        raise PlanError(f"{path} is a stack of {count} matrices: its statistics need one XᵀX per slice, shape "
                        f"(stacked axes..., {d_in}, {d_in}), not {tuple(xtx.shape)}")
    fields = (xtx.reshape(count, d_in, d_in), jnp.asarray(stats.abs_sum).reshape(count, d_in),
              jnp.asarray(stats.fisher_rows).reshape(count, d_in),
              jnp.broadcast_to(jnp.asarray(stats.tokens), xtx.shape[:-2]).reshape(count))
    return [type(stats)(*(f[i] for f in fields)) for i in range(count)]


def _stacked(pairs) -> tuple[jax.Array, jax.Array]:
    return jnp.stack([a for a, _ in pairs]), jnp.stack([b for _, b in pairs])


def _apply_ranks(params, ranks: Mapping[str, int], config: ModelConfig | None, matrices: Mapping[str, Matrix],
                 decomposition: Decomposition = Decomposition(), stats=None, spectra=None, gram: bool = False):
    plain = decomposition.method == "svd"
    if gram and not plain:
        raise PlanError(f"gram=True computes plain SVD factors; decomposition {decomposition.method!r} needs its own")
    factor, reduce = (gram_factors, gram_reduce) if gram else (svd_factors, reduce_factors)

    def new_node(path, node):
        return place_like(node, matrices[path], _new_weights(path, node), rank_axis=None) if path in ranks else node

    def _new_weights(path, node):
        m, r = matrices[path], ranks[path]
        dtype = node["A" if m.rank is not None else "weight" if m.view.transposed else "kernel"].dtype
        if spectra is not None and path in spectra:  # precomputed by the same decomposition
            a, b = truncate(spectra[path], r, dtype)
            return write_factors(node, m, a[None], b[None])
        if m.rank is None:
            k3 = kernel_stack(node, m)
            if plain:
                a, b = batched(lambda k: factor(k, r))(k3)
            else:  # slice by slice, each with its own statistics
                a, b = _stacked([decomposed_factors(k3[i], r, decomposition, si)
                                 for i, si in enumerate(slice_stats(stats[path], m.count, path))])
        else:
            a3, b3 = factor_stacks(node, m)
            if plain:
                a, b = batched(lambda x, y: reduce(x, y, r))(a3, b3)
            else:
                a, b = _stacked([reduced_factors(a3[i], b3[i], r, decomposition, si)
                                 for i, si in enumerate(slice_stats(stats[path], m.count, path))])
        return write_factors(node, m, a, b)

    new_params = _map_matrices(params, new_node, matrices)
    if config is None:
        return new_params, None
    return new_params, config.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})


def factorize(params, plan: RankPlan | Mapping[str, int], config: ModelConfig | None = None, *,
              stats=None, decomposition: str | Decomposition | None = None, spectra=None,
              views: Mapping[str, MatrixView] | None = None, gram: bool = False):
    """Each selected dense kernel K -> A, B of `svd_factors` at its planned rank (bias untouched), or of the
    plan's (or `decomposition`'s) method with calibration `stats` (path -> MatrixStats; see module docstring).

    plan: a `RankPlan`, or a ranks dict path -> r applied exactly as given (even where it saves nothing).
    spectra: path -> `Spectrum` already computed with the same decomposition (e.g. by `allocate_ranks`'s
    caller); those matrices are truncated from it instead of being decomposed again.
    views: {glob: MatrixView} for N-D / stacked kernels the defaults do not read (default: the plan's).
    A stacked or N-D kernel S + I + O becomes A (S + I + (r,)), B (S + (r,) + O), each slice's truncated SVD.
    Shardings: eagerly, A and B of a NamedSharding-placed kernel keep its partitioning on their own side
    (sharded.py); under jit pass `sharded.factorized_shardings(...)` as out_shardings. gram=True computes the
    factors through KᵀK so that a sharded kernel is never gathered (plain SVD only; sharded.py has the error).
    Returns (params, config) with `LinearSpec("lowrank", rank=r)` for each factorized path (None if no config).
    """
    views = _views(plan, views)
    ranks = dict(plan) if isinstance(plan, Mapping) else resolve_ranks(params, plan)
    matrices = check_ranks(params, ranks, views)
    for path in ranks:
        if matrices[path].rank is not None:
            raise PlanError(f"{path} is already factorized (rank {matrices[path].rank}); lower it with reduce_rank")
    _check_kinds(config, ranks)
    return _apply_ranks(params, ranks, config, matrices, _decomposition(plan, decomposition, stats, ranks), stats,
                        spectra, gram)


def reduce_rank(params, plan: RankPlan | Mapping[str, int], config: ModelConfig | None = None, *,
                stats=None, decomposition: str | Decomposition | None = None, spectra=None,
                views: Mapping[str, MatrixView] | None = None, gram: bool = False):
    """Factorized matrices -> the planned lower rank by `reduce_factors` (A B is never formed), or by the
    chosen decomposition's re-truncation of A B with `stats`; dense ones selected by the plan are factorized,
    so a stage can widen the set. Returns (params, config) as `factorize` (spectra: as there).
    """
    views = _views(plan, views)
    ranks = dict(plan) if isinstance(plan, Mapping) else resolve_ranks(params, plan)
    matrices = check_ranks(params, ranks, views)
    _check_kinds(config, ranks)
    return _apply_ranks(params, ranks, config, matrices, _decomposition(plan, decomposition, stats, ranks), stats,
                        spectra, gram)


def densify(params, config: ModelConfig | None = None, views: Mapping[str, MatrixView] | None = None):
    """Every factorized matrix -> kernel = A B per slice (float32 or wider, cast back), shaped S + I + O;
    config's linears reset to dense. A view with `transposed=True` writes a 2-D `weight` (d_out, d_in) instead.

    Without a config every A, B pair is taken to be lowrank; with one, cola/sltrain linears are left alone.
    """
    matrices, dense_paths = find_matrices(params, views), []

    def new_node(path, node):
        m = matrices[path]
        if m.rank is None or (config is not None and config.linear(path).kind != "lowrank"):
            return node
        dense_paths.append(path)
        a3, b3 = factor_stacks(node, m)
        k3 = _matmul(a3.astype(_compute_dtype(a3)), b3.astype(_compute_dtype(b3))).astype(a3.dtype)
        return write_kernel(node, m, k3, transposed=m.view.transposed)

    new_params = _map_matrices(params, new_node, matrices)
    if config is None:
        return new_params, None
    return new_params, config.with_linears({p: LinearSpec() for p in dense_paths})
