"""Hard-concrete masks: closed forms against Monte Carlo and hand-written numpy, target shapes, the GQA rule."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig

GQA = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=4, num_heads=6, num_kv_heads=3,
                  head_dim=8, max_seq_len=32)
MHA = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=4,
                  max_seq_len=32)


@pytest.mark.parametrize("temperature", [2 / 3, 0.83])
def test_prob_nonzero_matches_monte_carlo(temperature):
    log_alpha = {"z_int": jnp.array([-4.0, -2.0, -0.5, 0.0, 1.0, 3.0, 4.6])}
    n = 200_000
    keys = jax.random.split(jax.random.key(0), n)
    samples = jax.vmap(lambda k: M.sample(log_alpha, k, temperature)["z_int"])(keys)
    monte_carlo = np.asarray((samples > 0).mean(axis=0))
    closed = np.asarray(M.prob_nonzero(log_alpha, temperature)["z_int"])
    # Louizos et al.: P(z > 0) = 1 − σ(β log(−γ/ζ) − log α), written out here in numpy
    by_hand = 1 - 1 / (1 + np.exp(-(temperature * np.log(0.1 / 1.1) - np.asarray(log_alpha["z_int"]))))
    np.testing.assert_allclose(closed, by_hand, rtol=1e-6)
    np.testing.assert_allclose(monte_carlo, closed, atol=4 * np.sqrt(0.25 / n))
    assert float(samples.min()) == 0.0 and float(samples.max()) == 1.0  # the stretch-and-clip makes exact 0s, 1s


def test_samples_are_differentiable_in_log_alpha():
    log_alpha = M.init_log_alpha(jax.random.key(0), GQA, mean=0.0, std=1.0)
    grad = jax.grad(lambda a: sum(z.sum() for z in M.sample(a, jax.random.key(1)).values()))(log_alpha)
    assert all(float(g.sum()) > 0 for g in grad.values())  # larger log α, larger z


def test_deterministic_masks_keep_exactly_the_target_counts_with_gqa_groups():
    target = M.TargetShape(num_layers=3, hidden_size=40, num_heads=4, num_kv_heads=2, intermediate_size=50)
    target = target.resolve(GQA)
    log_alpha = {name: jax.random.uniform(jax.random.key(i), s, minval=-4, maxval=4)
                 for i, (name, s) in enumerate(M.mask_shapes(GQA).items())}
    masks = {name: np.asarray(z) for name, z in M.deterministic(log_alpha, GQA, target).items()}
    scores = {name: np.asarray(s) for name, s in M.soft_scores(log_alpha).items()}
    assert (masks["z_layer"] != 0).sum() == 3 and (masks["z_hidden"] != 0).sum() == 40
    assert ((masks["z_int"] != 0).sum(axis=1) == 50).all()
    for name in masks:  # kept units keep their soft score σ(0.8 log α / β) ...
        kept = masks[name] != 0
        np.testing.assert_array_equal(masks[name][kept], scores[name][kept])
    # ... and they are the best ones: the smallest kept layer score beats every dropped one
    assert scores["z_layer"][masks["z_layer"] != 0].min() > scores["z_layer"][masks["z_layer"] == 0].max()
    for layer in range(4):  # heads: 2 groups of 2 = the best pair of each group, then the best 2 groups
        grouped = scores["z_head"][layer].reshape(3, 2)
        best_pair = np.sort(grouped, axis=1)[:, ::-1][:, :2].sum(axis=1)
        expected_groups = set(np.argsort(-best_pair)[:2].tolist())
        kept = (masks["z_head"][layer] != 0).reshape(3, 2)
        assert set(np.flatnonzero(kept.any(axis=1)).tolist()) == expected_groups
        assert all(kept[g].sum() == 2 for g in expected_groups)


def test_deterministic_masks_without_a_target_keep_the_expected_counts():
    log_alpha = {"z_int": jnp.array([[4.0, 4.0, -4.0, -4.0, 0.3], [4.0, -4.0, -4.0, -4.0, -4.0]])}
    expected = np.round(np.asarray(M.prob_nonzero(log_alpha)["z_int"]).sum(axis=1))
    masks = np.asarray(M.deterministic(log_alpha, MHA)["z_int"])
    np.testing.assert_array_equal((masks != 0).sum(axis=1), expected)


def test_expected_size_is_the_papers_formula_for_mha():
    rng = np.random.default_rng(0)
    c = MHA
    p = {name: rng.uniform(0, 1, shape).astype(np.float32) for name, shape in M.mask_shapes(c).items()}
    d, H = c.hidden_size, c.num_heads
    # Sheared-LLaMA / reference l0_module: per head 4d²/H, per intermediate dim 3d, each weighted by the layer,
    # head / int and hidden scores (hidden enters as Σ p_hidden in place of d)
    by_hand = 0.0
    for layer in range(c.num_layers):
        heads = sum(p["z_layer"][layer] * p["z_head"][layer, h] * (4 * d * d / H) * p["z_hidden"].sum() / d
                    for h in range(H))
        inter = sum(p["z_layer"][layer] * p["z_int"][layer, j] * 3 * p["z_hidden"].sum()
                    for j in range(c.intermediate_size))
        by_hand += heads + inter
    got = float(M.expected_size({k: jnp.asarray(v) for k, v in p.items()}, c))
    assert got == pytest.approx(by_hand, rel=1e-5)
    assert float(M.expected_size({}, c)) == M.matrix_size(c)


def test_expected_size_counts_a_kv_group_while_any_of_its_query_heads_may_survive():
    c = GQA  # 3 groups of 2 query heads, hd 8, d 48
    head = np.zeros((4, 6), np.float32)
    head[:, 0], head[:, 1] = 0.5, 0.5  # group 0: each query head kept with p = 1/2 → group kept with p = 3/4
    got = float(M.expected_size({"z_head": jnp.asarray(head), "z_int": jnp.zeros((4, 64))}, c))
    assert got == pytest.approx(4 * 2 * 8 * 48 * (0.5 + 0.5 + 0.75))


def test_target_shapes_that_cannot_be_reached_are_refused():
    with pytest.raises(M.ShapeError, match="hidden_size 64 must be an integer in \\[1, 48\\]"):
        M.TargetShape(4, 64, 6, 64).resolve(GQA)
    with pytest.raises(M.ShapeError, match="num_heads 5 is not a multiple of num_kv_heads 3"):
        M.TargetShape(4, 48, 5, 64).resolve(GQA)
    with pytest.raises(M.ShapeError, match="3 query heads per kv group, more than the parent's 2"):
        M.TargetShape(4, 48, 3, 64, num_kv_heads=1).resolve(GQA)
    with pytest.raises(M.ShapeError, match="num_layers 0"):
        M.TargetShape(0, 48, 6, 64).resolve(GQA)
    assert M.TargetShape(2, 16, 2, 20).resolve(MHA).num_kv_heads == 2  # MHA stays MHA
    assert M.TargetShape(2, 16, 3, 20).resolve(GQA).num_kv_heads == 3  # GQA keeps its groups by default


def test_target_sparsity_and_clamp():
    t = M.TargetShape(3, 24, 3, 30, 3).resolve(GQA)
    assert M.target_sparsity(t, GQA) == {"z_layer": 0.25, "z_head": 0.5, "z_int": 1 - 30 / 64, "z_hidden": 0.5}
    clamped = M.clamp_log_alpha({"z_layer": jnp.array([-9.0, 0.0, 9.0])})["z_layer"]
    np.testing.assert_allclose(clamped, [math.log(0.01), 0.0, math.log(100)], rtol=1e-6)
