"""Dynamic batch loading: the weight update against its formula, sampling by weight, resume, bad input."""
import numpy as np
import pytest

import plrd_jax.data.dynamic_loading as D


def test_update_is_the_exponentiated_gap_with_smoothing():
    w, losses, refs = [0.5, 0.3, 0.2], [2.1, 3.0, 1.5], [2.0, 2.2, 1.5]
    got = D.update_weights(w, losses, refs, smoothing=1e-4)
    raw = np.array(w) * np.exp(np.array(losses) - np.array(refs))  # softmax(log w + Δ) = w·e^Δ / Σ
    expected = (1 - 1e-4) * raw / raw.sum() + 1e-4 / 3
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.argmax(got - w) == 1  # the domain lagging its reference most (Δ = 0.8) gains the most


def test_clamp_ignores_domains_that_beat_their_reference():
    w, refs = [0.4, 0.6], [2.0, 2.0]
    unclamped = D.update_weights(w, [1.0, 2.0], refs, smoothing=0.0)
    clamped = D.update_weights(w, [1.0, 2.0], refs, smoothing=0.0, clamp=True)
    np.testing.assert_allclose(clamped, w)  # Δ = (−1, 0) → (0, 0): nothing moves
    assert unclamped[0] < 0.4  # without the clamp the domain that is ahead loses weight


def test_repeated_updates_move_weight_toward_the_lagging_domain_and_stay_a_distribution():
    domains = D.Domains.build(["wikitext", "shakespeare", "pydoc"], [0.6, 0.2, 0.2],
                              {"wikitext": 3.0, "shakespeare": 3.5, "pydoc": 2.0}, update_every=5)
    state = D.init_state(domains)
    for step in range(5, 55, 5):
        state = D.update(state, domains, [3.1, 3.4, 2.6], step)  # pydoc lags most (0.6), shakespeare is ahead
        w = np.array(state.weights)
        assert w.sum() == pytest.approx(1.0, abs=1e-12) and (w >= 1e-4 / 3).all()
    first, last = np.array(state.history[0][1]), np.array(state.history[-1][1])
    assert last[2] > 0.95 and last[2] > first[2] and last[1] < first[1]
    assert [s for s, _ in state.history] == [0] + list(range(5, 55, 5))


def test_batches_follow_the_weights_and_resume_exactly():
    windows = [np.full((7, 4), i, np.int32) + np.arange(7, dtype=np.int32)[:, None] * 10 for i in range(3)]
    domains = D.Domains(("a", "b", "c"), (0.7, 0.2, 0.1))
    state, counts = D.init_state(domains), np.zeros(3)
    straight = []
    for step in range(200):
        tokens, ids, state = D.sample_batch(state, windows, 8, step, seed=3)
        np.testing.assert_array_equal(tokens[:, 0] % 10, ids)  # each row comes from the domain it drew
        counts += np.bincount(ids, minlength=3)
        straight.append(tokens)
    np.testing.assert_allclose(counts / counts.sum(), [0.7, 0.2, 0.1], atol=0.03)
    assert sum(state.cursors) == 200 * 8

    resumed = D.init_state(domains)
    for step in range(100):
        _, _, resumed = D.sample_batch(resumed, windows, 8, step, seed=3)
    resumed = D.LoaderState.from_dict(resumed.to_dict())  # through JSON-able metadata
    for step in range(100, 200):
        tokens, _, resumed = D.sample_batch(resumed, windows, 8, step, seed=3)
        np.testing.assert_array_equal(tokens, straight[step])
    # a domain's windows come in its epoch order: the first 7 of domain "a" are a permutation of its 7 windows
    first = D.sample_batch(D.LoaderState((1.0, 1e-9, 1e-9), (0, 0, 0)), windows, 7, 0, seed=3)[0]
    assert sorted(first[:, 0].tolist()) == list(range(0, 70, 10))


def test_bad_domain_input_is_refused_with_one_line():
    with pytest.raises(D.DomainError, match="unknown domain 'github'"):
        D.resolve_sources(["wikitext", "github"])
    assert D.resolve_sources(["github"], {"github": "code/*.jsonl"}) == {"github": "code/*.jsonl"}
    with pytest.raises(D.DomainError, match="reference losses given for arxiv"):
        D.Domains.build(["wikitext", "pydoc"], reference_losses={"wikitext": 3.0, "pydoc": 2.0, "arxiv": 1.0})
    with pytest.raises(D.DomainError, match="no reference loss for pydoc"):
        D.Domains.build(["wikitext", "pydoc"], reference_losses={"wikitext": 3.0})
    with pytest.raises(D.DomainError, match="must be positive and sum to 1"):
        D.Domains(("a", "b"), (0.7, 0.7))
    with pytest.raises(D.DomainError, match="distinct"):
        D.Domains(("a", "a"), (0.5, 0.5))
