"""plrd_jax: single-parent model families by progressive low-rank decomposition, in JAX.

The names a user needs, in the order of the pipeline (docs/api.md has each with an example):

  model      ModelConfig, LinearSpec, ConfigError, Decoder, init_params, init_cache, abstract_params,
             arrange_layers, count_params
  load/save  load_model (embedded name, HF dir, GGUF, family member "DIR:N"), save_hf, FamilyStore, load_member
  data       load_dataset (a corpus tokenized into windows [N, T]: a TokenDataset)
  transforms RankPlan, factorize, reduce_rank, densify, calibrate, compress, allocate_ranks,
             sparse_plus_lowrank, prune
  training   HealConfig, heal
  families   Schedule, Stage, run_family
  evaluation perplexity, generate
"""
from plrd_jax.data.windows import TokenDataset, load_dataset
from plrd_jax.evaluation.generate import generate
from plrd_jax.evaluation.perplexity import perplexity
from plrd_jax.io.hf import save_hf
from plrd_jax.io.load import load_model
from plrd_jax.io.store import FamilyStore, load_member
from plrd_jax.methods.plrd import Schedule, Stage, run_family
from plrd_jax.nn.accounting import count_params
from plrd_jax.nn.config import ConfigError, LinearSpec, ModelConfig
from plrd_jax.nn.layout import arrange_layers
from plrd_jax.nn.model import Decoder, abstract_params, init_cache, init_params
from plrd_jax.training.loop import heal
from plrd_jax.training.optim import HealConfig
from plrd_jax.transforms.allocate import allocate_ranks
from plrd_jax.transforms.compress import compress
from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.transforms.factorize import densify, factorize, reduce_rank
from plrd_jax.transforms.plan import RankPlan
from plrd_jax.transforms.prune import prune
from plrd_jax.transforms.sparse import sparse_plus_lowrank

__all__ = ["ModelConfig", "LinearSpec", "ConfigError", "Decoder", "init_params", "init_cache", "abstract_params",
           "arrange_layers", "count_params", "load_model", "save_hf", "FamilyStore", "load_member", "load_dataset", "TokenDataset",
           "RankPlan",
           "factorize", "reduce_rank", "densify", "calibrate", "compress", "allocate_ranks", "sparse_plus_lowrank",
           "prune", "HealConfig", "heal", "Schedule", "Stage", "run_family", "perplexity", "generate"]
