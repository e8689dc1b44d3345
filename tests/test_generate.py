import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import ModelConfig
from plrd_jax.evaluation.generate import generate
from plrd_jax.nn.model import Decoder, init_cache, init_params

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


def test_sampled_windows_follow_the_model_and_start_with_the_start_token():
    """At a temperature near 0 every sampled token is the argmax of a cache-free forward over the window so far
    (an independent path); at temperature 1 the windows are seeded, differ across the batch, and fill `count`
    rows even when count is not a multiple of the batch."""
    from plrd_jax.evaluation.generate import sample_windows

    params = init_params(CONFIG, seed=3)
    cold = np.asarray(sample_windows(CONFIG, params, 3, 12, start_token=7, temperature=1e-6, batch_size=2))
    assert cold.shape == (3, 12) and (cold[:, 0] == 7).all()
    logits = np.asarray(Decoder(CONFIG).apply({"params": params}, jnp.asarray(cold)))
    np.testing.assert_array_equal(logits[:, :-1].argmax(-1), cold[:, 1:])
    warm = np.asarray(sample_windows(CONFIG, params, 5, 12, start_token=7, temperature=1.0, seed=1, batch_size=4))
    np.testing.assert_array_equal(warm, np.asarray(sample_windows(CONFIG, params, 5, 12, 7, 1.0, seed=1,
                                                                  batch_size=4)))
    assert len({tuple(r) for r in warm}) == 5
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sample_windows(CONFIG, params, 1, CONFIG.max_seq_len + 1, 7)


def test_parent_samples_join_a_mixture_as_given_windows(tmp_path):
    from plrd_jax.data.corpora import DataError
    from plrd_jax.data.mixture import load_mixture, sampled_share

    text = tmp_path / "a.txt"
    text.write_text("abcdefgh" * 20)

    class Chars:
        eos_token_id, fingerprint = None, "chars"

        def encode(self, s):
            return [ord(c) % 50 for c in s]

    samples = np.full((30, 8), 5, np.int32)
    mix = load_mixture(f"{text}=1,parent-samples=1", Chars(), 8, samples=samples)
    assert (mix.windows[1::2] == 5).all() and not (mix.windows[0::2] == 5).all()  # alternating, 20 + 20
    assert len(mix) == 40 and mix.spec["components"][1]["tokens_sha256"]
    assert sampled_share(f"{text}=1,parent-samples=3", 40) == 31 and sampled_share(str(text), 40) == 0
    with pytest.raises(DataError, match="go together"):
        load_mixture(f"{text},parent-samples", Chars(), 8)
