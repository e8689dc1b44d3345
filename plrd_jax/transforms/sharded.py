"""Factors that keep the kernel's sharding, computed without gathering the kernel.

A kernel K laid out S + I + O (views.py) with partitioning (s…, i…, o…) — a PartitionSpec, or a tuple of
flax logical axis names (`nn.with_logical_partitioning`, nnx `sharding` metadata) — gives its factors

    A: S + I + (r,)   partitioned (s…, i…, rank_axis)
    B: S + (r,) + O   partitioned (s…, rank_axis, o…)

so A keeps d_in's sharding, B keeps d_out's, and the rank axis is replicated unless `rank_axis` names a mesh
axis (or logical name) for it (`factor_spec`, `factorized_shardings` for a whole tree, e.g. as a jit's
out_shardings).

An exact SVD needs the whole matrix on one device, so on a sharded kernel XLA all-gathers it. `gram_factors`
instead reads K through products whose sharded axis is contracted: G = KᵀK (d_out × d_out, summed over the
shards of d_in by an all-reduce), G = V Λ Vᵀ, σ = √λ, and

    A = K V_r Σ_r^{-1/2}   (d_in × r, sharded like K's rows, a local matmul)    B = Σ_r^{1/2} V_rᵀ

(A B = K V_r V_rᵀ, the projection of K onto its top-r right singular vectors: the truncated SVD.) Squaring K
squares its condition number, so directions with σ_i < √ε·σ_1 (ε the float's epsilon) lose their digits; they
are the ones truncation drops first, and the kept top-r part matches the SVD's to about ε·σ_1²/σ_r² relative.
`gram_reduce` lowers the rank of factors the same way (CholeskyQR: A = Q_A R_A with R_A from AᵀA).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from plrd_jax.transforms.views import Matrix, MatrixView, compute_dtype, find_matrices


def factor_spec(spec, m: Matrix, ndim: int, rank_axis=None) -> tuple[tuple, tuple]:
    """(A's, B's) partitioning from the kernel's `spec` (a PartitionSpec or logical-name tuple, padded with None
    to the kernel's `ndim`) under the kernel's view: see the module docstring."""
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    s = m.view.stack
    n_in = ndim - s - 1 if m.view.n_in is None else m.view.n_in
    if m.view.transposed:  # weight (d_out, d_in): A (d_in, r), B (r, d_out)
        return (entries[1], rank_axis), (rank_axis, entries[0])
    return entries[:s + n_in] + (rank_axis,), entries[:s] + (rank_axis,) + entries[s + n_in:]


def factorized_shardings(params, shardings, ranks: Mapping[str, int], views: Mapping[str, MatrixView] | None = None,
                         rank_axis=None):
    """The shardings of `factorize(params, ranks)`'s output: `shardings` (a tree matching `params` of
    NamedShardings, or of PartitionSpecs — e.g. flax's `nn.get_partition_spec` of logical names) with each
    factorized node's kernel entry replaced by A's and B's (`factor_spec`), of the same type."""
    matrices = find_matrices(params, views)

    def wrap(like, entries):
        spec = PartitionSpec(*entries)
        return NamedSharding(like.mesh, spec) if isinstance(like, NamedSharding) else spec

    def walk(node, sharding, path):
        if path in ranks:
            m = matrices[path]
            key = "weight" if m.view.transposed else "kernel"
            ks = sharding[key]
            a, b = factor_spec(ks.spec if isinstance(ks, NamedSharding) else ks, m, node[key].ndim, rank_axis)
            rest = {k: v for k, v in sharding.items() if k != key}
            return {**rest, "A": wrap(ks, a), "B": wrap(ks, b)}
        if isinstance(node, Mapping):
            return {k: walk(v, sharding[k], f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        return sharding

    return walk(params, shardings, "")


def _psd_root(g: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """Top-r eigenpairs of a symmetric PSD g, descending: (λ (r,), V (n, r)), λ clipped at 0."""
    lam, v = jnp.linalg.eigh(g)
    return jnp.maximum(lam[::-1][:r], 0.0), v[:, ::-1][:, :r]


def gram_factors(kernel: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """K (d_in, d_out) ≈ A B at rank r through G = KᵀK (module docstring); factors in K's dtype."""
    k = kernel.astype(compute_dtype(kernel))
    lam, v = _psd_root(jnp.matmul(k.T, k, precision="highest"), r)
    sigma = jnp.sqrt(lam)
    inv_root = jnp.where(sigma > 0, 1.0 / jnp.sqrt(jnp.maximum(sigma, 1e-30)), 0.0)
    a = jnp.matmul(k, v, precision="highest") * inv_root
    b = jnp.sqrt(sigma)[:, None] * v.T
    return a.astype(kernel.dtype), b.astype(kernel.dtype)


def gram_reduce(a: jax.Array, b: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """A (d_in, k), B (k, d_out) -> rank r without forming A B or gathering A: with AᵀA = W Λ Wᵀ (k × k),
    Q_A = A W Λ^{-1/2} is orthonormal and A B = Q_A (Λ^{1/2} Wᵀ B); the small k × d_out right factor is then
    truncated by `gram_factors` on its transpose's Gram."""
    dtype = compute_dtype(a)
    a32, b32 = a.astype(dtype), b.astype(dtype)
    lam, w = _psd_root(jnp.matmul(a32.T, a32, precision="highest"), a.shape[1])
    inv = jnp.where(lam > 0, 1.0 / jnp.sqrt(jnp.maximum(lam, 1e-30)), 0.0)
    q = jnp.matmul(a32, w, precision="highest") * inv  # (d_in, k), orthonormal columns
    small = jnp.sqrt(lam)[:, None] * jnp.matmul(w.T, b32, precision="highest")  # (k, d_out): A B = q small
    u, s, vt = jnp.linalg.svd(small, full_matrices=False)
    root = jnp.sqrt(s[:r])
    return (jnp.matmul(q, u[:, :r], precision="highest") * root).astype(a.dtype), \
        (root[:, None] * vt[:r]).astype(b.dtype)


def place_like(node: Mapping, m: Matrix, new: dict, rank_axis=None) -> dict:
    """Eagerly: `new`'s A and B put on the factor shardings derived from the node's sharded weight leaf (a
    no-op for leaves that are not NamedSharding-placed jax.Arrays, e.g. tracers or numpy arrays)."""
    key = "A" if m.rank is not None else "weight" if m.view.transposed else "kernel"
    leaf = node[key]
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
    if not isinstance(sharding, NamedSharding) or isinstance(leaf, jax.core.Tracer):
        return new
    if m.rank is not None:  # already factors: keep A's and B's own partitioning, the rank axis as asked
        a_spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        b_leaf = node["B"]
        b_spec = tuple(b_leaf.sharding.spec) + (None,) * (b_leaf.ndim - len(b_leaf.sharding.spec))
        s = m.view.stack
        a, b = a_spec[:-1] + (rank_axis,), b_spec[:s] + (rank_axis,) + b_spec[s + 1:]
    else:
        a, b = factor_spec(sharding.spec, m, leaf.ndim, rank_axis)
    return {**new, "A": jax.device_put(new["A"], NamedSharding(sharding.mesh, PartitionSpec(*a))),
            "B": jax.device_put(new["B"], NamedSharding(sharding.mesh, PartitionSpec(*b)))}
