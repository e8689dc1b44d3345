"""Rank-r approximations of a matrix that minimize a weighted error: plain, whitened (SVD-LLM), ASVD, FWSVD.

Every method is a truncated SVD in a scaled space. With an invertible input scaling S (d_in, d_in) and
K (d_in, d_out), `y = x K`:

    M = S K = U Σ Vᵀ,     K_r = S⁻¹ U_r Σ_r V_rᵀ,     A = S⁻¹ U_r √Σ_r (d_in, r),  B = √Σ_r V_rᵀ (r, d_out)

is the rank-r K_r minimizing ‖S (K − K_r)‖_F, and that error is √(Σ_{i≥r} σ_i²). The factors handed out
are then *balanced*: column i of A and row i of B rescaled to equal norms (A B unchanged; for plain SVD this is
U_r √Σ_r and √Σ_r V_rᵀ exactly). With a scaling, S⁻¹ makes A's columns orders of magnitude smaller than B's
rows, and Adam, whose steps are about lr per entry, would then move A far faster (relatively) than B and
destabilize healing. The methods differ in S:

  svd       S = I                               minimizes ‖K − K_r‖_F (the weights)
  whitened  S = Lᵀ with L Lᵀ = XᵀX (Cholesky)   minimizes ‖X (K − K_r)‖_F (the layer's outputs on the
            calibration inputs X): SVD-LLM's truncation-aware whitening, in our (d_in, d_out) kernel layout
  asvd      S = diag(mean_t |x_ti|)^α            activation-aware scaling of the input channels (ASVD, α≈0.5)
  fisher    S = diag(√(Σ_j F_ij))                the input rows of K weighted by their Fisher information (FWSVD:
            F_ij = Σ_w (∂L_w/∂K_ij)², summed over the row); same row weighting as ASVD's Fisher option

Whitening falls back when XᵀX is not (numerically) positive definite: Cholesky of XᵀX + λ·mean(diag)·I with
λ = `damping` (default 1e-6), then λ = 1e-4 and 1e-2, then an eigendecomposition XᵀX = V Λ Vᵀ with S = Λ^½ Vᵀ
(eigenvalues clamped at 1e-6 · the largest). `Scaling.kind` says which was used (`describe_scaling`).
The Cholesky factor is computed as D·chol(D⁻¹ H D⁻¹), D = diag(√H_ii): the same factor, far better
conditioned in float32 when a few input channels carry most of the energy (as in LLMs).

The factors of an already factorized matrix are re-truncated without forming K = A B:
S A = Q_a R_a, Bᵀ = Q_b R_b, R_a R_bᵀ = U Σ Vᵀ, so S A B = (Q_a U) Σ (Q_b V)ᵀ.
All linear algebra runs in float32 (or wider) with jnp, eagerly or under jit; the statistics come from
`plrd_jax.transforms.calibrate` (`MatrixStats`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("svd", "whitened", "asvd", "fisher")
# Scaling.kind codes.
SCALING_KINDS = ("identity", "diagonal", "cholesky", "cholesky-damped", "eigh")
FALLBACK_DAMPINGS = (1e-4, 1e-2)
EIGEN_FLOOR = 1e-6


class DecompositionError(ValueError):
    """A decomposition that cannot be computed from what was given (unknown method, missing statistics)."""


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """Which rank-r approximation to take (module docstring). alpha: ASVD's exponent; damping: the first
    Cholesky jitter of the whitened method, relative to the mean diagonal of XᵀX."""

    method: str = "svd"
    alpha: float = 0.5
    damping: float = 1e-6

    def __post_init__(self):
        if self.method not in METHODS:
            raise DecompositionError(f"unknown decomposition {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.alpha < 0:
            raise DecompositionError(f"asvd alpha must be >= 0, got {self.alpha}")
        if self.damping < 0:
            raise DecompositionError(f"whitening damping must be >= 0, got {self.damping}")

    @property
    def needs_stats(self) -> bool:
        return self.method != "svd"

    @property
    def needs_fisher(self) -> bool:
        return self.method == "fisher"


def as_decomposition(value: "str | Decomposition | None") -> Decomposition:
    """A Decomposition from its method name ("whitened"), itself, or None (plain "svd")."""
    if value is None:
        return Decomposition()
    if isinstance(value, Decomposition):
        return value
    if isinstance(value, str):
        return Decomposition(value)
    raise DecompositionError(f"decomposition must be a method name or a Decomposition, got {type(value).__name__}")


class Scaling(NamedTuple):
    """S and S⁻¹: (d_in,) vectors for a diagonal S, (d_in, d_in) matrices otherwise; kind: index into
    SCALING_KINDS (int32 array), damping: the λ used by a Cholesky (0 otherwise)."""

    forward: jax.Array
    inverse: jax.Array
    kind: jax.Array
    damping: jax.Array


class Spectrum(NamedTuple):
    """K ≈ left[:, :r] · diag(s[:r]) · right[:r] for every r: the method's best rank-r approximation.

    left (d_in, k) = S⁻¹ U, s (k,) descending, right (k, d_out) = Vᵀ (orthonormal rows), scaling: the S used.
    """

    left: jax.Array
    s: jax.Array
    right: jax.Array
    scaling: Scaling


def _dtype(*xs):
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _matmul(x, y):
    return jnp.matmul(x, y, precision="highest")


def _scale(s: jax.Array, k: jax.Array) -> jax.Array:
    return s[:, None] * k if s.ndim == 1 else _matmul(s, k)


def _diagonal(v: jax.Array) -> Scaling:
    v = jnp.maximum(v, EIGEN_FLOOR * jnp.max(v))
    v = jnp.where(jnp.max(v) > 0, v, 1.0)
    return Scaling(v, 1.0 / v, jnp.int32(1), jnp.zeros((), v.dtype))


def whitening(xtx: jax.Array, damping: float = 1e-6) -> Scaling:
    """S = Lᵀ, L Lᵀ = XᵀX (+ λ·mean diag·I), with the fallbacks of the module docstring; jit-able."""
    h = xtx.astype(_dtype(xtx))
    h = (h + h.T) / 2
    mean_diag = jnp.mean(jnp.diag(h))
    mean_diag = jnp.where(mean_diag > 0, mean_diag, 1.0)
    return _first_scaling(h, mean_diag, (damping, *FALLBACK_DAMPINGS))


# Module-level, not closures over each other: a self-referencing closure would form a reference cycle that keeps
# its Gram-sized arrays alive until Python's cyclic collector runs (in a streamed 7B decomposition, about 1 GB
# per 11008-wide matrix).
def _first_scaling(h: jax.Array, mean_diag: jax.Array, dampings: tuple[float, ...], first: bool = True) -> Scaling:
    """The Cholesky scaling at the first of `dampings` that works, else the eigendecomposition's."""
    if not dampings:
        return _eigh_scaling(h)
    upper, inv, ok = _damped_cholesky(h, mean_diag, dampings[0])
    found = Scaling(upper, inv, jnp.int32(2 if first else 3), jnp.asarray(dampings[0], h.dtype))
    del upper, inv
    try:
        ok = bool(ok)
    except jax.errors.ConcretizationTypeError:  # under jit: the later attempts run only when needed
        return jax.lax.cond(ok, lambda found=found: found,
                            lambda: _first_scaling(h, mean_diag, dampings[1:], first=False))
    if ok:
        return found
    del found  # not held while the next attempt runs
    return _first_scaling(h, mean_diag, dampings[1:], first=False)


def _damped_cholesky(h: jax.Array, mean_diag: jax.Array, lam: float):
    """(Lᵀ, L⁻ᵀ, ok) of h + λ·mean_diag·I, as D·chol(D⁻¹ (h + λ…) D⁻¹) with D = diag(√(h + λ…)_ii)."""
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    damped = h + lam * mean_diag * eye
    d = jnp.sqrt(jnp.diag(damped))
    lc = jnp.linalg.cholesky(damped / d[:, None] / d[None, :])
    upper = (lc * d[:, None]).T  # Lᵀ = (D L_C)ᵀ
    inv = jax.scipy.linalg.solve_triangular(lc.T, eye, lower=False) / d[:, None]  # L⁻ᵀ = D⁻¹ L_C⁻ᵀ
    ok = jnp.all(jnp.isfinite(upper)) & jnp.all(jnp.isfinite(inv)) & jnp.all(jnp.diag(damped) > 0)
    return upper, inv, ok


def _eigh_scaling(h: jax.Array) -> Scaling:
    lam, v = jnp.linalg.eigh(h)
    lam = jnp.maximum(lam, EIGEN_FLOOR * jnp.max(jnp.abs(lam)))
    lam = jnp.where(lam > 0, lam, 1.0)
    root = jnp.sqrt(lam)
    return Scaling((v * root).T, v / root, jnp.int32(4), jnp.zeros((), h.dtype))


def input_scaling(decomposition: Decomposition, stats=None, d_in: int | None = None) -> Scaling:
    """The S of `decomposition` from a matrix's `MatrixStats` (svd needs none; then give d_in)."""
    method = decomposition.method
    if method == "svd":
        if d_in is None:
            d_in = stats.xtx.shape[0]
        ones = jnp.ones((d_in,), jnp.float32)
        return Scaling(ones, ones, jnp.int32(0), jnp.zeros((), jnp.float32))
    if stats is None:
        raise DecompositionError(f"decomposition {method!r} needs calibration statistics (plrd_jax.transforms.calibrate)")
    if method == "whitened":
        return whitening(stats.xtx, decomposition.damping)
    if method == "asvd":
        return _diagonal(jnp.asarray(stats.abs_sum / stats.tokens, jnp.float32) ** decomposition.alpha)
    return _diagonal(jnp.sqrt(jnp.asarray(stats.fisher_rows, jnp.float32)))


def check_stats(decomposition: Decomposition, stats, path: str = "this matrix") -> None:
    """Raise DecompositionError unless `stats` (a MatrixStats or None) serves `decomposition` (outside jit)."""
    if not decomposition.needs_stats:
        return
    if stats is None:
        raise DecompositionError(f"decomposition {decomposition.method!r} needs calibration statistics for {path} "
                                 "(plrd_jax.transforms.calibrate.calibrate)")
    try:
        no_fisher = decomposition.needs_fisher and not np.any(np.asarray(stats.fisher_rows))
    except jax.errors.TracerArrayConversionError:  # under jit: nothing to check
        no_fisher = False
    if no_fisher:
        raise DecompositionError(f"decomposition 'fisher' needs Fisher rows for {path}: "
                                 "calibrate(..., fisher=True)")


def describe_scaling(scaling: Scaling) -> str:
    """'identity', 'diagonal', 'cholesky (damping 1e-06)', 'cholesky-damped (damping 0.01)' or 'eigh'."""
    kind = SCALING_KINDS[int(scaling.kind)]
    return f"{kind} (damping {float(scaling.damping):.0e})" if kind.startswith("cholesky") else kind


def is_fallback(description: str) -> bool:
    """Whether a `describe_scaling` text is a whitening fallback (a damped Cholesky or the eigendecomposition)."""
    return description.startswith("cholesky-damped") or description == "eigh"


def scaling_report(decomposition: Decomposition, scalings: dict[str, str]) -> dict:
    """{"decomposition", "scalings": description -> how many matrices, "fallbacks": path -> description} from
    path -> `describe_scaling` text of every matrix decomposed."""
    counts: dict[str, int] = {}
    for description in scalings.values():
        counts[description] = counts.get(description, 0) + 1
    return {"decomposition": decomposition.method, "scalings": counts,
            "fallbacks": {p: d for p, d in scalings.items() if is_fallback(d)}}


def describe_fallbacks(report: dict | None) -> str:
    """'' when no whitening fell back, else e.g. 'whitening fell back on 2 of 210 matrices: layers_3/mlp/down
    eigh, layers_7/mlp/down cholesky-damped (damping 1e-02)' (from a `scaling_report`)."""
    fallbacks = (report or {}).get("fallbacks") or {}
    if not fallbacks:
        return ""
    total = sum(report["scalings"].values())
    listed = ", ".join(f"{p} {d}" for p, d in list(fallbacks.items())[:4])
    return (f"whitening fell back on {len(fallbacks)} of {total} matrices: {listed}"
            + (", ..." if len(fallbacks) > 4 else ""))


def decompose(kernel: jax.Array, decomposition: Decomposition, stats=None) -> Spectrum:
    """The method's full spectrum of K (d_in, d_out): k = min(d_in, d_out) directions (module docstring)."""
    scaling = input_scaling(decomposition, stats, kernel.shape[0])
    dtype = _dtype(kernel)
    u, s, vt = jnp.linalg.svd(_scale(scaling.forward.astype(dtype), kernel.astype(dtype)), full_matrices=False)
    return Spectrum(_scale(scaling.inverse.astype(dtype), u), s, vt, scaling)


def decompose_factors(a: jax.Array, b: jax.Array, decomposition: Decomposition, stats=None) -> Spectrum:
    """The spectrum of K = A B (A (d_in, k), B (k, d_out)) without forming K, k directions."""
    scaling = input_scaling(decomposition, stats, a.shape[0])
    dtype = _dtype(a, b)
    q_a, r_a = jnp.linalg.qr(_scale(scaling.forward.astype(dtype), a.astype(dtype)))
    q_b, r_b = jnp.linalg.qr(b.T.astype(dtype))
    u, s, vt = jnp.linalg.svd(_matmul(r_a, r_b.T), full_matrices=False)
    return Spectrum(_scale(scaling.inverse.astype(dtype), _matmul(q_a, u)), s, _matmul(vt, q_b.T), scaling)


def truncate(spectrum: Spectrum, r: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """A (d_in, r), B (r, d_out) with A B = left_r diag(s_r) right_r, balanced (‖A[:, i]‖ = ‖B[i]‖, see the
    module docstring), cast to `dtype`."""
    return _truncate(spectrum.left, spectrum.s, spectrum.right, r, None if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(3, 4))  # one compiled function per shape, not a dozen eager ops
def _truncate(left, s, right, r, dtype):
    left, s, right = left[:, :r], s[:r], right[:r]
    left_norm, right_norm = jnp.linalg.norm(left, axis=0), jnp.linalg.norm(right, axis=1)
    ok = (left_norm > 0) & (right_norm > 0)
    # column i of A: left_i · √(s_i ‖right_i‖ / ‖left_i‖); row i of B: right_i · √(s_i ‖left_i‖ / ‖right_i‖)
    ratio = jnp.where(ok, right_norm / jnp.where(ok, left_norm, 1.0), 1.0)
    a = left * jnp.sqrt(s * ratio)
    b = jnp.sqrt(s / ratio)[:, None] * right
    return (a, b) if dtype is None else (a.astype(dtype), b.astype(dtype))


def decomposed_factors(kernel: jax.Array, r: int, decomposition="svd", stats=None) -> tuple[jax.Array, jax.Array]:
    """K (d_in, d_out) -> A (d_in, r), B (r, d_out) of the method's rank-r approximation, in K's dtype."""
    return truncate(decompose(kernel, as_decomposition(decomposition), stats), r, kernel.dtype)


def reduced_factors(a: jax.Array, b: jax.Array, r: int, decomposition="svd", stats=None
                    ) -> tuple[jax.Array, jax.Array]:
    """A (d_in, k), B (k, d_out) -> the method's rank-r approximation of A B as factors, in A's dtype."""
    return truncate(decompose_factors(a, b, as_decomposition(decomposition), stats), r, a.dtype)


def output_errors(spectrum: Spectrum, xtx) -> np.ndarray:
    """E (k + 1,), float64: E[r] = ‖X (K − K_r)‖_F² for r = 0..k, from XᵀX alone.

    K − K_r = Σ_{i≥r} s_i l_i ρ_iᵀ with orthonormal rows ρ_i, so E[r] = Σ_{i≥r} s_i² l_iᵀ XᵀX l_i;
    E[0] = ‖X K‖² and, for the whitened method, E[r] = Σ_{i≥r} σ_i². A vector `xtx` (d_in,) is read as the
    diagonal matrix: E[r] = Σ_i xtx_i ‖(K − K_r)_i‖² (e.g. the Fisher rows).
    """
    left = np.asarray(spectrum.left, np.float64)
    h = np.asarray(xtx, np.float64)
    quad = h @ (left * left) if h.ndim == 1 else np.sum(left * (h @ left), axis=0)
    weights = np.asarray(spectrum.s, np.float64) ** 2 * quad
    tail = np.cumsum(weights[::-1])[::-1]
    return np.concatenate([tail, [0.0]])
