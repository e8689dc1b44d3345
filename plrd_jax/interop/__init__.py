"""Run factorized param trees (`plrd_jax.transforms.factorize`: kernel -> A, B) in a user's flax model.

  linen  LowRankDense, LowRankDenseGeneral: drop-in layers holding A, B (and flax's bias);
         lowrank_linen(module): the unmodified module running any tree whose Dense/DenseGeneral nodes hold
         A, B (a method interceptor; `lowrank_scope()` for the same as a context manager)
  nnx    LowRankLinear, LowRankLinearGeneral: nnx.Modules with nnx.Param A, B, bias;
         lowrank_nnx(model, tree) / dense_nnx(model, tree=None): swap nnx.Linear/LinearGeneral for the
         low-rank modules (and back) where the tree holds A, B (a kernel), loading the tree with the
         model's own Variable types and metadata

Layout (the transforms'): a kernel S + I + O (stacked axes, contracted input axes, output axes) becomes
A S + I + (r,), B S + (r,) + O, K = A B per slice; a 2-D kernel (d_in, d_out) gives A (d_in, r), B (r, d_out).
"""
from plrd_jax.interop.linen import (LowRankDense, LowRankDenseGeneral, LowRankModel, factor_product,
                                    lowrank_interceptor, lowrank_linen, lowrank_scope)
from plrd_jax.interop.nnx import LowRankLinear, LowRankLinearGeneral, dense_nnx, lowrank_nnx

__all__ = ["LowRankDense", "LowRankDenseGeneral", "LowRankModel", "factor_product", "lowrank_interceptor",
           "lowrank_linen", "lowrank_scope", "LowRankLinear", "LowRankLinearGeneral", "lowrank_nnx", "dense_nnx"]
