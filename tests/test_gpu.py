"""Checks that only mean something on a GPU (skipped elsewhere): the cuDNN fused-attention path of bf16 models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import ModelConfig
from plrd_jax.io.load import cast
from plrd_jax.nn.model import Decoder, init_cache, init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_fused_attention_matches_float32_and_the_unfused_bf16_path():
    config = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=256)
    params = init_params(config, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 96), 0, config.vocab_size)
    reference = Decoder(config).apply({"params": params}, tokens)  # float32: the einsum path
    bf16_config, bf16_params = cast(config, params, jnp.bfloat16)
    fused = Decoder(bf16_config).apply({"params": bf16_params}, tokens)  # no cache: cuDNN attention
    unfused, _ = Decoder(bf16_config).apply({"params": bf16_params}, tokens,
                                            cache=init_cache(bf16_config, 2, 96))  # prefill: the einsum path
    assert np.isfinite(np.asarray(fused)).all()
    assert rel(fused, reference) < 3e-2
    assert rel(fused, reference) < 1.5 * rel(unfused, reference) + 1e-3
