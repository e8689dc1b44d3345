import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.config import ModelConfig
from plrd_jax.generate import generate
from plrd_jax.model import Decoder, init_cache, init_params

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64)


def test_cached_greedy_generation_equals_full_recomputation():
    params = init_params(CONFIG, seed=1)
    new = list(generate(CONFIG, params, [1, 2, 3], 10))
    seq = [1, 2, 3]
    for _ in range(10):  # reference: no cache, the whole sequence each time
        seq.append(int(jnp.argmax(Decoder(CONFIG).apply({"params": params}, jnp.asarray([seq]))[0, -1])))
    assert new == seq[3:]


def test_chunked_cache_forward_equals_one_pass():
    params = init_params(CONFIG, seed=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 12)), jnp.int32)
    full = Decoder(CONFIG).apply({"params": params}, tokens)
    cache, chunks = init_cache(CONFIG, 2, 16), []
    for lo, hi in ((0, 5), (5, 6), (6, 12)):
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo))
        logits, cache = Decoder(CONFIG).apply({"params": params}, tokens[:, lo:hi], positions=pos, cache=cache)
        chunks.append(logits)
    np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), full, atol=1e-5)


def test_sampling_is_seeded_and_context_is_checked():
    params = init_params(CONFIG)
    a = list(generate(CONFIG, params, [4], 6, temperature=1.0, seed=7))
    assert a == list(generate(CONFIG, params, [4], 6, temperature=1.0, seed=7))
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        list(generate(CONFIG, params, [1] * 60, 10))
