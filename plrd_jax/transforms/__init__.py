"""Parameter transforms: pure functions from (params, plan, config) to (params, config).

  plan.py            RankPlan (which matrix gets which rank), resolve_ranks, parameter counts
  factorize.py       factorize (K -> A B), reduce_rank (A B -> lower rank without forming K), densify (A B -> K)
  decompositions.py  svd / whitened (SVD-LLM) / asvd / fisher (FWSVD) rank-r factors from calibration statistics
  calibrate.py       the statistics: XᵀX, input norms, Fisher rows of every linear layer over calibration text
  allocate.py        ranks across matrices for a parameter budget: uniform, energy, sensitivity (dense or a rank)
  compress.py        one member in one call: allocation + decomposition
  sparse.py          sparse-plus-low-rank members K ≈ A B + S (S: values + int32 indices on a fixed support)
  prune.py           structured pruning by masks (heads, MLP channels, hidden channels, layers)
  sequential.py      compression layer by layer, each calibrated on the outputs of the compressed layers before it
"""
from plrd_jax.transforms.allocate import allocate_ranks
from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.transforms.compress import compress
from plrd_jax.transforms.decompositions import Decomposition, DecompositionError
from plrd_jax.transforms.factorize import densify, factorize, reduce_rank
from plrd_jax.transforms.plan import PlanError, RankPlan, find_matrices, predict_param_count, resolve_ranks
from plrd_jax.transforms.prune import prune
from plrd_jax.transforms.sparse import sparse_plus_lowrank

__all__ = ["RankPlan", "PlanError", "Decomposition", "DecompositionError", "factorize", "reduce_rank", "densify",
           "calibrate", "allocate_ranks", "compress", "sparse_plus_lowrank", "prune", "resolve_ranks",
           "find_matrices", "predict_param_count"]
