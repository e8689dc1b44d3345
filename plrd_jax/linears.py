"""The one linear layer of the decoder and its parameterizations.

Every projection `y = x K`, `K (d_in × d_out)`, is a `Linear` whose `LinearSpec` (from the model config,
looked up by the matrix's path) chooses the parameters it holds:

  dense    kernel (d_in, d_out)                              y = x K
  lowrank  A (d_in, r), B (r, d_out)                         y = (x A) B
  cola     A (d_in, r), B (r, d_out)                         y = σ(x A) B          (σ = SiLU)
  sltrain  A (d_in, r), B (r, d_out), values (nnz,),        y = (α/r)(x A) B + x S
           indices (nnz,) int32: S's fixed support, flat positions in (d_in, d_out); an integer leaf, so it
           never trains (`plrd_jax.train.trainable` keeps floating leaves only) but saves and shards with the rest

`bias (d_out,)` is added when asked for (Qwen2's q/k/v). Factors are never multiplied into a dense K.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from plrd_jax.config import LinearSpec

# Name under which the r-dim activation of a factorized linear is tagged for remat policies (CoLA-M).
BOTTLENECK = "lowrank_bottleneck"


def default_kernel_init(d_in: int):
    return nn.initializers.normal(stddev=1.0 / math.sqrt(d_in))


def symmetric_uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def sparse_support(key: jax.Array, d_in: int, d_out: int, nnz: int) -> jax.Array:
    """A fixed random support: the first `nnz` of a permutation of all d_in·d_out positions, sorted."""
    flat = jax.random.permutation(key, d_in * d_out)[:nnz]
    return jnp.sort(flat).astype(jnp.int32)


def sparse_matmul(x: jax.Array, values: jax.Array, indices: jax.Array, d_in: int, d_out: int) -> jax.Array:
    """x S for S given by `values` at flat positions `indices` (row-major over (d_in, d_out))."""
    dense = jnp.zeros((d_in * d_out,), values.dtype).at[indices].add(values).reshape(d_in, d_out)
    return x @ dense.astype(x.dtype)


class Linear(nn.Module):
    features: int
    spec: LinearSpec = LinearSpec()
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d_in, d_out, spec = x.shape[-1], self.features, self.spec
        x = x.astype(self.dtype)
        if spec.kind == "dense":
            kernel = self.param("kernel", default_kernel_init(d_in), (d_in, d_out), self.param_dtype)
            y = x @ kernel.astype(self.dtype)
        else:
            r = spec.rank
            # Each factor at ~Xavier scale so that the product has the dense init's scale.
            scale = (r * (d_in + d_out)) ** -0.25 if spec.kind == "cola" else None
            a_init = nn.initializers.normal(scale) if scale else default_kernel_init(d_in)
            b_init = nn.initializers.normal(scale) if scale else (
                nn.initializers.zeros if spec.kind == "sltrain" else default_kernel_init(r))
            if spec.kind == "sltrain":  # Kaiming-uniform A, as in SLTrain
                a_init = symmetric_uniform(1 / math.sqrt(d_in))
            a = self.param("A", a_init, (d_in, r), self.param_dtype)
            b = self.param("B", b_init, (r, d_out), self.param_dtype)
            h = x @ a.astype(self.dtype)
            if spec.kind == "cola" and spec.activation:
                h = nn.silu(h)
            h = checkpoint_name(h, BOTTLENECK)
            y = h @ b.astype(self.dtype)
            if spec.kind == "sltrain":
                y = y * (spec.alpha / r)
                indices = self.param("indices", lambda k: sparse_support(k, d_in, d_out, spec.nnz))
                values = self.param("values", symmetric_uniform(1 / math.sqrt(d_in)), (spec.nnz,),
                                    self.param_dtype)
                y = y + sparse_matmul(x, values, indices, d_in, d_out)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (d_out,), self.param_dtype).astype(self.dtype)
        return y
