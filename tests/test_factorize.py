"""factorize / reduce_rank / densify against closed forms, with numpy's float64 SVD as the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax import Decoder, LinearSpec, ModelConfig, init_params
from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.factorize import densify, factorize, reduce_factors, reduce_rank, svd_factors
from plrd_jax.transforms.plan import PlanError, RankPlan, find_matrices, resolve_ranks, singular_values

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=32, qkv_bias=True)
TOKENS = jnp.array([[3, 17, 99, 42, 5, 64, 8, 120]])


def matrix(d_in, d_out, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((d_in, d_out)).astype(dtype)


def truncated(k, r):
    """Best rank-r approximation of K and all of K's singular values, in float64."""
    u, s, vt = np.linalg.svd(np.asarray(k, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], s


def product(a, b):
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG)


def test_full_rank_reproduces_the_kernel():
    k = matrix(64, 48)
    a, b = svd_factors(jnp.asarray(k), 48)
    assert a.shape == (64, 48) and b.shape == (48, 48)
    np.testing.assert_allclose(product(a, b), k, atol=2e-5 * np.abs(k).max())


@pytest.mark.parametrize("r", [1, 7, 24, 47])
def test_error_is_the_norm_of_the_dropped_singular_values(r):
    k = matrix(64, 48, seed=r)
    a, b = svd_factors(jnp.asarray(k), r)
    _, s = truncated(k, r)
    error = np.linalg.norm(k.astype(np.float64) - product(a, b))
    np.testing.assert_allclose(error, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-5)


def test_factors_are_balanced():
    k = matrix(50, 70, seed=3)
    a, b = map(np.asarray, svd_factors(jnp.asarray(k), 20))
    _, s = truncated(k, 20)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:20]), atol=1e-4 * s[0])
    np.testing.assert_allclose(b @ b.T, np.diag(s[:20]), atol=1e-4 * s[0])


def test_reduce_factors_is_the_truncated_svd_of_the_product():
    a, b = matrix(80, 24, seed=1), matrix(24, 50, seed=2)  # a rank-24 product, never formed by reduce_factors
    best, s = truncated(a @ b.astype(np.float64), 10)
    a2, b2 = reduce_factors(jnp.asarray(a), jnp.asarray(b), 10)
    assert a2.shape == (80, 10) and b2.shape == (10, 50)
    np.testing.assert_allclose(product(a2, b2), best, atol=1e-5 * s[0])
    np.testing.assert_allclose(np.linalg.svd(product(a2, b2), compute_uv=False)[:10], s[:10], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a2).T @ np.asarray(a2), np.diag(s[:10]), atol=1e-4 * s[0])
    np.testing.assert_allclose(np.asarray(b2) @ np.asarray(b2).T, np.diag(s[:10]), atol=1e-4 * s[0])
    np.testing.assert_allclose(singular_values(jnp.asarray(a), jnp.asarray(b)), s[:24], rtol=1e-5)


def test_reduce_rank_on_a_tree_matches_the_truncated_product():
    tree = {"w": {"A": matrix(40, 30, seed=4), "B": matrix(30, 60, seed=5), "bias": np.ones(60, np.float32)}}
    best, s = truncated(product(tree["w"]["A"], tree["w"]["B"]), 12)
    out, _ = reduce_rank(tree, RankPlan(matrices="w", rank=12))
    assert set(out["w"]) == {"A", "B", "bias"} and out["w"]["bias"] is tree["w"]["bias"]
    np.testing.assert_allclose(product(out["w"]["A"], out["w"]["B"]), best, atol=1e-5 * s[0])


def test_densify_after_full_rank_factorize_is_identity(params):
    full = {p: min(CONFIG.matrix_shape(p)) for p in CONFIG.matrix_paths()}
    factored, config = factorize(params, full, CONFIG)
    assert config.linear("layers_1/mlp/down") == LinearSpec("lowrank", rank=64)
    dense, config = densify(factored, config)
    assert config == CONFIG
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(dense), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_bfloat16_is_factorized_in_float32_and_cast_back():
    k = matrix(64, 48, seed=6)
    tree = {"w": {"kernel": jnp.asarray(k, jnp.bfloat16)}}
    out, _ = factorize(tree, {"w": 16})
    a, b = out["w"]["A"], out["w"]["B"]
    assert a.dtype == b.dtype == jnp.bfloat16
    best, s = truncated(tree["w"]["kernel"].astype(jnp.float32), 16)  # the reference sees the same bf16 K
    relative = np.linalg.norm(product(a.astype(jnp.float32), b.astype(jnp.float32)) - best) / np.linalg.norm(best)
    assert relative < 1e-2  # bfloat16 rounding of the factors only (SVD in bfloat16 is not even available)
    dense, _ = densify(out)
    assert dense["w"]["kernel"].dtype == jnp.bfloat16


def test_decoder_runs_on_factorized_and_reduced_params(params):
    dense_logits = Decoder(CONFIG).apply({"params": params}, TOKENS)
    full = {p: min(CONFIG.matrix_shape(p)) for p in CONFIG.matrix_paths()}
    factored, config = factorize(params, full, CONFIG)  # full rank: the same function as the dense model
    np.testing.assert_allclose(Decoder(config).apply({"params": factored}, TOKENS), dense_logits, atol=1e-4)

    small, config = factorize(params, RankPlan(matrices="attn", fraction=0.25), CONFIG)
    assert small["layers_0"]["attn"]["q"]["bias"] is params["layers_0"]["attn"]["q"]["bias"]
    smaller, config = reduce_rank(small, RankPlan(matrices=("attn", "mlp"), fraction=0.125), config)
    assert config.linear("layers_0/attn/q").rank == 8 and config.linear("layers_0/mlp/up").rank == 8
    assert count_params(smaller) < count_params(small) < count_params(params)
    logits = Decoder(config).apply({"params": smaller}, TOKENS)
    assert logits.shape == (1, 8, 128) and np.isfinite(logits).all()


def test_jit_with_static_ranks_matches_eager(params):
    plan = RankPlan(fraction=0.25)
    eager = factorize(params, plan)[0]
    jitted = jax.jit(lambda p: factorize(p, plan)[0])(params)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    a, b = jitted["layers_1"]["mlp"]["down"]["A"], jitted["layers_1"]["mlp"]["down"]["B"]
    e_a, e_b = eager["layers_1"]["mlp"]["down"]["A"], eager["layers_1"]["mlp"]["down"]["B"]
    np.testing.assert_allclose(product(a, b), product(e_a, e_b), atol=1e-5)
    energy = RankPlan(energy=0.9)
    with pytest.raises(PlanError, match="resolve it outside jit"):
        jax.jit(lambda p: factorize(p, energy)[0])(params)
    ranks = resolve_ranks(params, energy)  # resolved outside, applied inside
    jax.jit(lambda p: factorize(p, ranks)[0])(params)


def test_factorize_refuses_factorized_and_cola_matrices(params):
    small, _ = factorize(params, RankPlan(matrices="mlp", rank=8))
    with pytest.raises(PlanError, match="layers_0/mlp/gate is already factorized \\(rank 8\\); lower it with"):
        factorize(small, RankPlan(matrices="mlp", rank=4))
    with pytest.raises(PlanError, match="rank 9 for layers_0/mlp/gate exceeds its current rank 8"):
        reduce_rank(small, {"layers_0/mlp/gate": 9})
    cola = CONFIG.with_linears({"layers_0/attn/q": LinearSpec("cola", rank=8)})
    cola_params = init_params(cola)
    with pytest.raises(PlanError, match="layers_0/attn/q is a cola linear"):
        reduce_rank(cola_params, RankPlan(matrices="attn", rank=4), cola)
    dense, config = densify(cola_params, cola)
    assert "A" in dense["layers_0"]["attn"]["q"] and config == cola
    assert find_matrices(dense)["layers_0/attn/q"].rank == 8
