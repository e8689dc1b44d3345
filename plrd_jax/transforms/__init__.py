"""Parameter transforms: pure functions from (params, plan, config) to (params, config).

  plan.py       RankPlan (which matrix gets which rank), resolve_plan / resolve_ranks, parameter counts
  factorize.py  factorize (K -> A B), reduce_rank (A B -> lower rank without forming K), densify (A B -> K)
  decompositions.py  svd / whitened (SVD-LLM) / asvd / fisher (FWSVD) rank-r approximations from calibration stats
  allocate.py   ranks across matrices for a parameter budget: uniform, energy, sensitivity (greedy / knapsack)
  sparse.py     sparse-plus-low-rank members K ≈ A B + S (S: values + int32 indices on a fixed support)
"""
from plrd_jax.transforms.allocate import ALLOCATIONS, Allocation, allocate_ranks, plot_rank_heatmap, ranks_by_layer
from plrd_jax.transforms.decompositions import (METHODS, Decomposition, DecompositionError, Spectrum, decompose,
                                                decompose_factors, decomposed_factors, describe_scaling,
                                                output_errors, reduced_factors, truncate)
from plrd_jax.transforms.factorize import densify, factorize, reduce_factors, reduce_rank, svd_factors
from plrd_jax.transforms.plan import (GROUPS, MatrixPlan, PlanError, RankPlan, count_params, find_matrices,
                                      predict_param_count, resolve_plan, resolve_ranks, singular_values)
from plrd_jax.transforms.sparse import sparse_plus_lowrank

__all__ = ["ALLOCATIONS", "Allocation", "allocate_ranks", "plot_rank_heatmap", "ranks_by_layer",
           "METHODS", "Decomposition", "DecompositionError", "Spectrum", "decompose", "decompose_factors",
           "decomposed_factors", "describe_scaling", "output_errors", "reduced_factors", "truncate",
           "GROUPS", "MatrixPlan", "PlanError", "RankPlan", "count_params", "densify", "factorize",
           "find_matrices", "predict_param_count", "reduce_factors", "reduce_rank", "resolve_plan",
           "resolve_ranks", "singular_values", "sparse_plus_lowrank", "svd_factors"]
