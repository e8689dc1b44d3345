"""Sequential compression: each layer calibrated on the inputs that the already compressed layers produce.

One-pass compression (`calibrate` once, then `compress` / `reduce_rank`) takes every matrix's statistics
XᵀX from the uncompressed model, so layer i is fitted to inputs it will never see once layers 0..i−1 are
compressed. The sequential variant (as in SparseGPT, and SVD-LLM's sequential update) goes layer by layer:

    for i = 0 .. L−1 (then the LM head, if it has a rank):
        stats_i = calibrate(model with layers 0..i−1 compressed, layers i.. as given; layer i's Linears only)
        layer i's matrices <- their rank-r factors by `reduce_rank(..., stats=stats_i)`

All of layer i's matrices are calibrated in the same pass, on the layer input produced by the compressed
layers 0..i−1 and, inside the layer, by layer i's own matrices as given (e.g. `o` sees the attention of
the uncompressed q, k, v). For the whitened decomposition each K' then minimizes ‖X_i (K − K')‖_F over the
rank-r matrices, X_i those sequential inputs, and that error is √(Σ_{j≥r} σ_j²) of Lᵀ K, L Lᵀ = X_iᵀ X_i.

Cost: one calibration per layer. Statistics of layer i alone depend on the forward of layers 0..i only and
XLA drops the rest (`calibrate(..., paths=...)`), so the passes cost about L/2 full forwards in all (Fisher
statistics need each window's full backward and cost L full passes). Each pass compiles once: the config
changes as layers are compressed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.nn.config import ModelConfig
from plrd_jax.transforms.decompositions import Decomposition, as_decomposition
from plrd_jax.transforms.factorize import reduce_rank
from plrd_jax.transforms.plan import PlanError, check_ranks

__all__ = ["layer_groups", "sequential_compress"]


def layer_groups(paths) -> list[tuple[str, list[str]]]:
    """[(group, paths)] in the order the model runs them: "layers_0", "layers_1", ... by layer index, then
    every path outside the layers (e.g. "lm_head") as one last group "rest"."""
    layers: dict[int, list[str]] = {}
    rest = []
    for path in paths:
        m = re.match(r"layers_(\d+)/", path)
        if m:
            layers.setdefault(int(m.group(1)), []).append(path)
        else:
            rest.append(path)
    groups = [(f"layers_{i}", layers[i]) for i in sorted(layers)]
    return groups + ([("rest", rest)] if rest else [])


def sequential_compress(params, config: ModelConfig, windows: np.ndarray, ranks: Mapping[str, int],
                        decomposition: str | Decomposition = "whitened", batch_size: int = 4,
                        progress: Callable[[int, int], None] | None = None, *, mesh: Mesh | None = None):
    """`reduce_rank(params, ranks, config, decomposition=...)` with each layer's statistics taken sequentially
    (module docstring): the matrices of layer i are calibrated over `windows` [N, T] on the model whose layers
    0..i−1 are already compressed. Returns (params, config) as `reduce_rank` does.

    ranks: path -> rank (`resolve_ranks`, `allocate_ranks(...).ranks`); matrices not in it are kept. The ranks
    are taken as given: an allocation made from one-pass statistics is applied here unchanged.
    decomposition: "whitened", "asvd", "fisher" (Fisher rows are calibrated too) or a `Decomposition`; plain
    "svd" needs no statistics, so it is one `reduce_rank`, the same as one-pass.
    batch_size, mesh: as `calibrate`. progress(done, total) is called after each group (a layer, or the
    paths outside the layers) is compressed: groups done, groups in all.
    """
    decomposition = as_decomposition(decomposition)
    ranks = dict(ranks)
    check_ranks(params, ranks)
    for path in ranks:
        kind = config.linear(path).kind
        if kind not in ("dense", "lowrank"):
            raise PlanError(f"{path} is a {kind} linear; only dense and lowrank matrices can be re-ranked")
    if not decomposition.needs_stats:
        params, config = reduce_rank(params, ranks, config, decomposition=decomposition)
        if progress is not None:
            progress(1, 1)
        return params, config
    groups = layer_groups(ranks)
    for done, (_, paths) in enumerate(groups, 1):
        stats = calibrate(config, params, windows, batch_size, fisher=decomposition.needs_fisher, mesh=mesh,
                          paths=paths)
        params, config = reduce_rank(params, {p: ranks[p] for p in paths}, config, stats=stats,
                                     decomposition=decomposition)
        if progress is not None:
            progress(done, len(groups))
    return params, config
