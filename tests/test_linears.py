"""The Linear parameterizations against their closed forms (numpy), their inits, their errors, their storage."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import ConfigError, LinearSpec, ModelConfig
from plrd_jax.nn.linears import (Linear, choose_sparse_method, factorized_spec, gather_sparse_matmul,
                              sparse_support, sparse_to_dense, sltrain_matmul)

D_IN, D_OUT, R = 24, 40, 6


def silu(x):
    return x / (1 + np.exp(-x))


def random_params(params, seed=0):
    """Every floating leaf redrawn N(0, 0.3²) (SLTrain's B starts at zero, which would hide A in a forward)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else x
           for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, new)


def dense_s(values, indices):
    """S (D_IN, D_OUT) from its support in numpy."""
    s = np.zeros(D_IN * D_OUT)
    s[np.asarray(indices).astype(np.int64)] = np.asarray(values)
    return s.reshape(D_IN, D_OUT)


def apply(spec, x, seed=0, **kw):
    layer = Linear(D_OUT, spec, **kw)
    params = random_params(layer.init(jax.random.key(seed), x)["params"], seed)
    return layer.apply({"params": params}, x), {k: np.asarray(v, np.float64 if k != "indices" else None)
                                                for k, v in params.items()}


X = np.random.default_rng(0).normal(size=(2, 3, D_IN)).astype(np.float32)


# ---- forward = closed form ----------------------------------------------------------------------
def test_dense_is_x_k():
    y, p = apply(LinearSpec(), X)
    np.testing.assert_allclose(y, X @ p["kernel"], rtol=1e-5, atol=1e-5)


def test_lowrank_is_x_a_b():
    y, p = apply(LinearSpec("lowrank", rank=R), X)
    np.testing.assert_allclose(y, X @ p["A"] @ p["B"], rtol=1e-5, atol=1e-5)


def test_cola_is_silu_of_x_a_times_b_and_x_a_b_without_activation():
    y, p = apply(LinearSpec("cola", rank=R), X)
    np.testing.assert_allclose(y, silu(X @ p["A"]) @ p["B"], rtol=1e-5, atol=1e-5)
    y, p = apply(LinearSpec("cola", rank=R, activation=False), X)
    np.testing.assert_allclose(y, X @ p["A"] @ p["B"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["scatter", "gather", "auto"])
def test_sltrain_is_x_times_scaled_a_b_plus_dense_s(method):
    spec = factorized_spec("sltrain", D_IN, D_OUT, R, density=0.1, alpha=8.0)
    y, p = apply(spec, X, sparse_method=method)
    w = (8.0 / R) * p["A"] @ p["B"] + dense_s(p["values"], p["indices"])
    np.testing.assert_allclose(y, X @ w, rtol=1e-5, atol=1e-5)


def test_bias_is_added():
    layer = Linear(D_OUT, LinearSpec("cola", rank=R), use_bias=True)
    params = random_params(layer.init(jax.random.key(0), X)["params"])
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    np.testing.assert_allclose(layer.apply({"params": params}, X), silu(X @ p["A"]) @ p["B"] + p["bias"],
                               rtol=1e-5, atol=1e-5)


def test_gather_and_scatter_sparse_products_agree_with_numpy_and_in_their_gradients():
    rng = np.random.default_rng(1)
    indices = sparse_support(jax.random.key(3), D_IN, D_OUT, 100)
    values = rng.normal(size=100).astype(np.float32)
    x = rng.normal(size=(5, D_IN)).astype(np.float32)
    expected = x @ dense_s(values, indices)
    np.testing.assert_allclose(gather_sparse_matmul(x, values, indices, D_IN, D_OUT), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ sparse_to_dense(values, indices, D_IN, D_OUT), expected, rtol=1e-5, atol=1e-5)
    a, b = rng.normal(size=(D_IN, R)).astype(np.float32), rng.normal(size=(R, D_OUT)).astype(np.float32)
    loss = lambda method: lambda x, a, b, v: jnp.sum(jnp.sin(sltrain_matmul(x, a, b, v, indices, 0.5, method)))
    g_scatter = jax.grad(loss("scatter"), argnums=(0, 1, 2, 3))(x, a, b, values)
    g_gather = jax.grad(loss("gather"), argnums=(0, 1, 2, 3))(x, a, b, values)
    for gs, gg in zip(g_scatter, g_gather):
        np.testing.assert_allclose(gs, gg, rtol=1e-4, atol=1e-4)
    # d loss / d values[e] = Σ_n x[n, row_e] · g[n, col_e] with g = d loss / d y (closed form)
    y = x @ (0.5 * a @ b + dense_s(values, indices))
    g = np.cos(y)
    rows, cols = np.asarray(indices) // D_OUT, np.asarray(indices) % D_OUT
    np.testing.assert_allclose(g_scatter[3], (x[:, rows] * g[:, cols]).sum(0), rtol=1e-4, atol=1e-4)


def test_sparse_method_choice_gathers_for_few_tokens_and_scatters_for_training_batches():
    assert choose_sparse_method(1, 512, 1376, 128, int(0.03 * 512 * 1376)) == "gather"
    assert choose_sparse_method(2048, 512, 1376, 128, int(0.03 * 512 * 1376)) == "scatter"


# ---- initialization -----------------------------------------------------------------------------
def init(spec, d_in=256, d_out=384, seed=0):
    x = jnp.zeros((1, d_in))
    return Linear(d_out, spec).init(jax.random.key(seed), x)["params"]


def test_cola_factors_have_std_r_to_minus_quarter_times_fan_sum_to_minus_quarter():
    r = 32
    p = init(LinearSpec("cola", rank=r))
    expected = (r * (256 + 384)) ** -0.25
    for name in ("A", "B"):
        assert abs(float(np.std(p[name])) / expected - 1) < 0.03, name
    product_var = float(np.var(np.asarray(p["A"]) @ np.asarray(p["B"])))
    assert abs(product_var * (256 + 384) - 1) < 0.1  # ≈ Xavier-scale entries of A B


def test_sltrain_init_is_kaiming_uniform_a_zero_b_uniform_values_on_a_sorted_support():
    spec = factorized_spec("sltrain", 256, 384, 32, density=0.03, alpha=32)
    p = init(spec)
    bound = 1 / np.sqrt(256)
    assert spec.nnz == int(0.03 * 256 * 384) and p["values"].shape == (spec.nnz,)
    assert np.all(np.asarray(p["B"]) == 0)
    for name in ("A", "values"):
        v = np.asarray(p[name])
        assert np.abs(v).max() <= bound and abs(v.var() / (bound ** 2 / 3) - 1) < 0.1, name
    idx = np.asarray(p["indices"])
    assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0) and 0 <= idx[0] and idx[-1] < 256 * 384
    # drawn once from the init key: the same seed gives the same support, another seed another one
    np.testing.assert_array_equal(init(spec)["indices"], idx)
    assert not np.array_equal(init(spec, seed=1)["indices"], idx)


def test_lowrank_product_has_the_dense_init_variance():
    p = init(LinearSpec("lowrank", rank=64))
    product_var = float(np.var(np.asarray(p["A"]) @ np.asarray(p["B"])))
    assert abs(product_var * 256 - 1) < 0.1


# ---- what trains --------------------------------------------------------------------------------
def test_sltrain_gradients_reach_a_b_values_and_never_the_support():
    from plrd_jax.training.state import trainable

    spec = factorized_spec("sltrain", D_IN, D_OUT, R, density=0.1, alpha=8.0)
    layer = Linear(D_OUT, spec)
    params = layer.init(jax.random.key(0), X)["params"]
    train, support = trainable(params), params["indices"]
    assert train["indices"] is None and set(k for k, v in train.items() if v is not None) == {"A", "B", "values"}

    def loss(t):
        return jnp.sum(layer.apply({"params": {**t, "indices": support}}, X) ** 2)

    grads = jax.grad(loss)({k: v for k, v in train.items() if v is not None})
    assert float(jnp.abs(grads["B"]).max()) > 0 and float(jnp.abs(grads["values"]).max()) > 0
    assert float(jnp.abs(grads["A"]).max()) == 0  # B = 0 at init: A starts learning once B moves (as LoRA)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lowrank", "cola", "sltrain"])
def test_rank_at_or_above_min_dimension_is_a_one_line_error(kind):
    with pytest.raises(ConfigError, match=r"rank 24 for layers_0/attn/q \(24×40\) must be in 1\.\.23") as err:
        factorized_spec(kind, D_IN, D_OUT, D_IN, density=0.1, alpha=1, path="layers_0/attn/q")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("density", [0.0, 1.0, -0.5, 1.5, None])
def test_density_outside_the_open_unit_interval_is_an_error(density):
    with pytest.raises(ConfigError, match="density .* strictly between 0 and 1"):
        factorized_spec("sltrain", D_IN, D_OUT, R, density=density, alpha=1)


def test_unknown_parameterization_names_are_errors():
    with pytest.raises(ConfigError, match="unknown linear kind 'colaa'; expected one of dense, lowrank, cola, sltrain"):
        LinearSpec("colaa", rank=4)
    with pytest.raises(ConfigError, match="unknown factorized parameterization 'dense'"):
        factorized_spec("dense", D_IN, D_OUT, R)
    with pytest.raises(ConfigError, match="unknown sparse method 'csr'"):
        Linear(D_OUT, factorized_spec("sltrain", D_IN, D_OUT, R, density=0.1, alpha=1),
               sparse_method="csr").init(jax.random.key(0), X)
    with pytest.raises(ConfigError, match="unknown remat policy 'some'"):
        ModelConfig(remat="some")


# ---- storage ------------------------------------------------------------------------------------
def test_every_parameterization_saves_and_restores_through_the_orbax_store(tmp_path):
    from plrd_jax.nn.model import init_params
    from plrd_jax.io.store import FamilyStore, abstract_params

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                         num_kv_heads=2, max_seq_len=16)
    config = config.with_linears({
        "layers_0/attn/q": factorized_spec("lowrank", 32, 32, 4),
        "layers_0/attn/k": factorized_spec("cola", 32, 32, 4),
        "layers_0/mlp/up": factorized_spec("sltrain", 32, 48, 4, density=0.05, alpha=16),
        "layers_0/mlp/down": factorized_spec("sltrain", 48, 32, 8, density=0.1, alpha=8),
    })
    params = init_params(config, seed=3)
    store = FamilyStore(tmp_path / "store")
    store.save(7, params, {"config": config.to_dict()})
    store.close()
    restored, _ = FamilyStore(tmp_path / "store", read_only=True).restore(7, abstract_params(config))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert ModelConfig.from_dict(config.to_dict()) == config
