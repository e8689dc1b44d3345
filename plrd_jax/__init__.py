"""plrd_jax: single-parent model families by progressive low-rank decomposition, in JAX."""
from plrd_jax.nn.config import LinearSpec, ModelConfig, ConfigError
from plrd_jax.nn.model import Decoder, init_params, init_cache
from plrd_jax.nn.accounting import count_params

__all__ = ["LinearSpec", "ModelConfig", "ConfigError", "Decoder", "init_params", "init_cache", "count_params"]
