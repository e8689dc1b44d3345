"""Sparse-plus-low-rank members: K ≈ A B + S, SLTrain's form applied to compression.

For each selected dense kernel K (d_in, d_out) at rank r and density δ:

    A, B   the rank-r factors of the chosen decomposition (svd, whitened, asvd, fisher)
    R      = K − A B, the residual
    S      R kept on a fixed support of nnz = ⌊δ·d_in·d_out⌋ positions, zero elsewhere:
             "residual"    the nnz largest |R_ij|                         (minimizes ‖R − S‖_F for that nnz)
             "activation"  the nnz largest |R_ij|·√(XᵀX)_ii               (the output energy each entry carries,
                                                                           needs calibration statistics)
             "random"      a uniformly random support (SLTrain's), seeded

The matrix becomes an SLTrain linear, `LinearSpec("sltrain", rank=r, nnz=nnz, alpha=r)` (scale α/r = 1), with
params A, B, values (nnz,) and indices (nnz,) int32: the flat positions of S in (d_in, d_out), sorted. Its
size, r·(d_in + d_out) + 2·nnz, counts the values and the indices (`count_params` counts both leaves), the
same size `allocate_ranks(..., sparse_density=δ)` plans with. The forward pass applies S from values and
indices (`plrd_jax.nn.linears.sltrain_matmul`; its gather path never forms a d_in × d_out matrix).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.transforms.decompositions import (Decomposition, Spectrum, as_decomposition, check_stats, decompose,
                                                truncate)
from plrd_jax.transforms.plan import PlanError, node_at, check_ranks

SUPPORTS = ("residual", "activation", "random")


def sparse_nnz(d_in: int, d_out: int, density: float) -> int:
    """⌊δ·d_in·d_out⌋, SLTrain's count."""
    return int(density * d_in * d_out)


def residual_support(residual: jax.Array, nnz: int, support: str = "residual", xtx=None, seed: int = 0
                     ) -> jax.Array:
    """Sorted int32 flat positions (nnz,) of S in residual (d_in, d_out), chosen by `support`."""
    d_in, d_out = residual.shape
    if support == "random":
        flat = jax.random.permutation(jax.random.key(seed), d_in * d_out)[:nnz]
    else:
        score = jnp.abs(residual.astype(jnp.float32))
        if support == "activation":
            score = score * jnp.sqrt(jnp.maximum(jnp.diag(jnp.asarray(xtx, jnp.float32)), 0.0))[:, None]
        flat = jax.lax.top_k(score.reshape(-1), nnz)[1]
    return jnp.sort(flat).astype(jnp.int32)


def sparse_plus_lowrank(params, ranks: Mapping[str, int], config: ModelConfig | None = None, *,
                        density: float = 0.02, support: str = "residual", decomposition: str | Decomposition = "svd",
                        stats=None, spectra: Mapping[str, Spectrum] | None = None, seed: int = 0):
    """Each dense kernel in `ranks` (path -> r) -> A, B, values, indices of K ≈ A B + S (module docstring).

    spectra: precomputed `Spectrum`s of the decomposition (e.g. from `allocate.compute_spectra`), else computed.
    Returns (params, config) with an sltrain LinearSpec per path (config None when none is given).
    """
    if not 0 < density < 1:
        raise PlanError(f"sparse density must lie strictly between 0 and 1, got {density}")
    if support not in SUPPORTS:
        raise PlanError(f"unknown sparse support {support!r}; expected one of {', '.join(SUPPORTS)}")
    decomposition = as_decomposition(decomposition)
    matrices = check_ranks(params, ranks)
    for path in ranks:
        if matrices[path].rank is not None:
            raise PlanError(f"{path} is already factorized; sparse-plus-low-rank members start from dense kernels")
        s = None if stats is None else stats.get(path)
        check_stats(decomposition, s, path)
        if support == "activation" and s is None:
            raise PlanError(f"support 'activation' needs calibration statistics for {path}")
    new_nodes, specs = {}, {}
    for i, (path, r) in enumerate(ranks.items()):
        node = node_at(params, path)
        kernel = node["kernel"]
        s = None if stats is None else stats.get(path)
        spectrum = spectra[path] if spectra is not None else decompose(kernel, decomposition, s)
        a, b = truncate(spectrum, r)
        residual = kernel.astype(a.dtype) - jnp.matmul(a, b, precision="highest")
        d_in, d_out = kernel.shape
        nnz = sparse_nnz(d_in, d_out, density)
        indices = residual_support(residual, nnz, support, None if s is None else s.xtx, seed + i)
        values = residual.reshape(-1)[indices]
        new = {k: v for k, v in node.items() if k != "kernel"}
        new.update(A=a.astype(kernel.dtype), B=b.astype(kernel.dtype), values=values.astype(kernel.dtype),
                   indices=indices)
        new_nodes[path] = new
        specs[path] = LinearSpec("sltrain", rank=r, nnz=nnz, alpha=float(r))
    new_params = _replace_nodes(params, new_nodes)
    # A compressed member applies S by gather: no dense d_in × d_out matrix, not even as a temporary.
    return new_params, None if config is None else config.with_linears(specs).replace(sparse_method="gather")


def _replace_nodes(tree, nodes: Mapping[str, dict], path: str = ""):
    if path in nodes:
        return nodes[path]
    if isinstance(tree, Mapping):
        return {k: _replace_nodes(v, nodes, f"{path}/{k}" if path else str(k)) for k, v in tree.items()}
    return tree


def sparse_plus_lowrank_size(d_in: int, d_out: int, r: int, density: float) -> int:
    """Parameters of one member matrix: r·(d_in + d_out) + nnz values + nnz indices."""
    return r * (d_in + d_out) + 2 * sparse_nnz(d_in, d_out, density)

