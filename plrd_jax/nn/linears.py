"""The one linear layer of the decoder and its parameterizations.

Every projection `y = x K`, `K (d_in × d_out)`, is a `Linear` whose `LinearSpec` (from the model config,
looked up by the matrix's path) chooses the parameters it holds:

  dense    kernel (d_in, d_out)                              y = x K
  lowrank  A (d_in, r), B (r, d_out)                         y = (x A) B
  cola     A (d_in, r), B (r, d_out)                         y = σ(x A) B          (σ = SiLU; CoLA)
  sltrain  A (d_in, r), B (r, d_out), values (nnz,),        y = x ((α/r) A B + S)  (SLTrain)
           indices (nnz,) int32: S's fixed support, flat row-major positions in (d_in, d_out); an integer
           leaf, so it never trains (`plrd_jax.training.step.trainable` keeps floating leaves only) but saves and
           shards with the rest

`bias (d_out,)` is added when asked for (Qwen2's q/k/v). Factors are never multiplied into a dense K, except
inside SLTrain's "scatter" path (below), where the dense (α/r) A B + S exists only as a temporary of the step.

Initialization (each as its paper has it):
  dense    N(0, 1/d_in)
  lowrank  A ~ N(0, 1/d_in), B ~ N(0, 1/r): entries of A B have the dense init's variance 1/d_in
  cola     A, B ~ N(0, 1) · r^(−1/4) · (d_in + d_out)^(−1/4): entries of A B have variance 1/(d_in + d_out)
  sltrain  A ~ U(±1/√d_in) (PyTorch's Kaiming-uniform), B = 0, values ~ U(±1/√d_in); the support is the first
           nnz = ⌊δ·d_in·d_out⌋ of a random permutation of all positions, sorted, drawn once from the init key

The r-dim activation `x A` of every factorized layer (before CoLA's σ) is tagged `BOTTLENECK` with
`checkpoint_name`, so a remat policy can keep exactly these (CoLA-M; see `plrd_jax.nn.model.remat_policy`).

S is applied one of two ways (`ModelConfig.sparse_method`; "auto" picks by shape with `choose_sparse_method`):
  scatter  W = (α/r) A B + S built dense (S scattered into zeros), then y = x W; the reference implementation's
           way: O(d_in·d_out·(r + tokens)) work in dense matmuls, no (tokens × nnz) temporaries
  gather   y = (α/r)(x A) B + Σ_e x[:, row_e] v_e into column col_e (gather, then segment-sum); never forms a
           d_in × d_out matrix, O(tokens·(r(d_in + d_out) + nnz)) work but irregular memory access
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from plrd_jax.nn.config import SPARSE_METHODS, ConfigError, LinearSpec

# Name under which the r-dim activation x A of a factorized linear is tagged for remat policies (CoLA-M).
BOTTLENECK = "lowrank_bottleneck"
# Cost of one gathered-and-segment-summed sparse entry per token, in dense multiply-adds, fitted on CPU to
# forward + backward times of 256×688 … 1024×2736 matrices at δ = 0.03 (benchmarks/bench_pretrain.py):
# gather wins up to a few dozen tokens (decoding, small batches), scatter from a few hundred (training).
GATHER_COST = 150.0


# ---- specs --------------------------------------------------------------------------------------
def factorized_spec(kind: str, d_in: int, d_out: int, rank: int, *, density: float | None = None,
                    alpha: float | None = None, activation: bool = True, path: str = "matrix") -> LinearSpec:
    """The LinearSpec of a from-scratch factorized matrix (d_in × d_out): lowrank, cola or sltrain.

    Requires 0 < rank < min(d_in, d_out) (a factorization at full rank saves nothing); sltrain also needs a
    density δ in (0, 1) (nnz = ⌊δ·d_in·d_out⌋) and alpha (scale α/r)."""
    if kind not in ("lowrank", "cola", "sltrain"):
        raise ConfigError(f"unknown factorized parameterization {kind!r} for {path}; expected lowrank, cola or sltrain")
    if not 0 < rank < min(d_in, d_out):
        raise ConfigError(f"rank {rank} for {path} ({d_in}×{d_out}) must be in 1..{min(d_in, d_out) - 1} "
                          f"(below min(d_in, d_out) = {min(d_in, d_out)})")
    if kind != "sltrain":
        return LinearSpec(kind, rank=rank, activation=activation)
    if density is None or not 0.0 < density < 1.0:
        raise ConfigError(f"sparse density {density} for {path} must lie strictly between 0 and 1")
    if alpha is None or alpha <= 0:
        raise ConfigError(f"sltrain alpha {alpha} for {path} must be positive (the low-rank scale is alpha/rank)")
    return LinearSpec("sltrain", rank=rank, nnz=int(density * d_in * d_out), alpha=float(alpha))


# ---- initializers -------------------------------------------------------------------------------
def default_kernel_init(d_in: int):
    return nn.initializers.normal(stddev=1.0 / math.sqrt(d_in))


def symmetric_uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def cola_init(d_in: int, d_out: int, rank: int):
    """N(0, 1) · r^(−1/4) · (d_in + d_out)^(−1/4), for both CoLA factors."""
    return nn.initializers.normal(stddev=(rank * (d_in + d_out)) ** -0.25)


def sparse_support(key: jax.Array, d_in: int, d_out: int, nnz: int) -> jax.Array:
    """A fixed random support: the first `nnz` of a permutation of all d_in·d_out positions, sorted, int32."""
    if d_in * d_out >= 2 ** 31:
        raise ConfigError(f"a sparse {d_in}×{d_out} matrix has too many positions for int32 indices")
    flat = jax.random.permutation(key, d_in * d_out)[:nnz]
    return jnp.sort(flat).astype(jnp.int32)


# ---- the sparse part ----------------------------------------------------------------------------
def sparse_to_dense(values: jax.Array, indices: jax.Array, d_in: int, d_out: int, dtype=None) -> jax.Array:
    """S (d_in, d_out): zeros with S.flat[indices] = values (indices unique and sorted)."""
    dtype = values.dtype if dtype is None else dtype
    flat = jnp.zeros((d_in * d_out,), dtype).at[indices].set(values.astype(dtype), indices_are_sorted=True,
                                                               unique_indices=True)
    return flat.reshape(d_in, d_out)


def gather_sparse_matmul(x: jax.Array, values: jax.Array, indices: jax.Array, d_in: int, d_out: int) -> jax.Array:
    """x S (..., d_out) without forming S: y[..., j] = Σ_{e: col_e = j} x[..., row_e] · values[e]."""
    lead = x.shape[:-1]
    rows, cols = indices // d_out, indices % d_out
    contrib = x.reshape(-1, d_in).T[rows] * values.astype(x.dtype)[:, None]  # (nnz, tokens)
    y = jax.ops.segment_sum(contrib, cols, num_segments=d_out)  # (d_out, tokens)
    return y.T.reshape(*lead, d_out)


def choose_sparse_method(tokens: int, d_in: int, d_out: int, rank: int, nnz: int) -> str:
    """"gather" when its estimated cost tokens·(r(d_in + d_out) + GATHER_COST·nnz) is below the scatter path's
    d_in·d_out·(r + tokens), else "scatter" (see `GATHER_COST`)."""
    gather = tokens * (rank * (d_in + d_out) + GATHER_COST * nnz)
    scatter = d_in * d_out * (rank + tokens)
    return "gather" if gather < scatter else "scatter"


def sltrain_matmul(x: jax.Array, a: jax.Array, b: jax.Array, values: jax.Array, indices: jax.Array,
                   scale: float, method: str = "auto") -> jax.Array:
    """y = x (scale · A B + S) for A (d_in, r), B (r, d_out), S = sparse_to_dense(values, indices), by `method`
    ("scatter", "gather", or "auto": `choose_sparse_method` for this shape). Computes in x's dtype."""
    d_in, r = a.shape
    d_out = b.shape[1]
    if method == "auto":
        method = choose_sparse_method(math.prod(x.shape[:-1]), d_in, d_out, r, values.shape[0])
    if method == "scatter":
        w = scale * (a.astype(x.dtype) @ b.astype(x.dtype)) + sparse_to_dense(values, indices, d_in, d_out, x.dtype)
        return x @ w
    if method == "gather":
        h = checkpoint_name(x @ a.astype(x.dtype), BOTTLENECK)
        return scale * (h @ b.astype(x.dtype)) + gather_sparse_matmul(x, values, indices, d_in, d_out)
    raise ConfigError(f"unknown sparse method {method!r}; expected one of {', '.join(SPARSE_METHODS)}")


# ---- the layer ----------------------------------------------------------------------------------
class Linear(nn.Module):
    features: int
    spec: LinearSpec = LinearSpec()
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    sparse_method: str = "auto"  # sltrain only: "scatter" | "gather" | "auto" (by shape)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in, d_out, spec = x.shape[-1], self.features, self.spec
        # Matmuls on (tokens, d_in): XLA:CPU lays out the weight-gradient dots of 2-D operands without the
        # transposed copies that (batch, seq, d_in) operands cost (≈ 30 % of an MLP's backward there).
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, d_in)
        if spec.kind == "dense":
            kernel = self.param("kernel", default_kernel_init(d_in), (d_in, d_out), self.param_dtype)
            y = x @ kernel.astype(self.dtype)
        else:
            r = spec.rank
            if r > min(d_in, d_out) or (r == min(d_in, d_out) and spec.kind != "lowrank"):
                raise ConfigError(f"rank {r} of a {spec.kind} linear must be below min({d_in}, {d_out})")
            if spec.kind == "cola":
                a_init = b_init = cola_init(d_in, d_out, r)
            elif spec.kind == "sltrain":
                a_init, b_init = symmetric_uniform(1 / math.sqrt(d_in)), nn.initializers.zeros
            else:
                a_init, b_init = default_kernel_init(d_in), default_kernel_init(r)
            a = self.param("A", a_init, (d_in, r), self.param_dtype)
            b = self.param("B", b_init, (r, d_out), self.param_dtype)
            if spec.kind == "sltrain":
                indices = self.param("indices", lambda key: sparse_support(key, d_in, d_out, spec.nnz))
                values = self.param("values", symmetric_uniform(1 / math.sqrt(d_in)), (spec.nnz,),
                                    self.param_dtype)
                y = sltrain_matmul(x, a, b, values, indices, spec.alpha / r, self.sparse_method)
            else:
                h = checkpoint_name(x @ a.astype(self.dtype), BOTTLENECK)
                if spec.kind == "cola" and spec.activation:
                    h = nn.silu(h)
                y = h @ b.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d_out,), self.param_dtype).astype(self.dtype)
        return y.reshape(*lead, d_out)
