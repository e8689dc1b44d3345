"""Decompositions against closed forms computed with numpy in float64.

Whitened (SVD-LLM): with L Lᵀ = XᵀX, the best rank-r K' for ‖X(K − K')‖_F is L⁻ᵀ trunc_r(Lᵀ K), and that error
is the norm of the dropped singular values of Lᵀ K (Eckart–Young in the whitened space).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax import ModelConfig, init_params
from plrd_jax.transforms.calibrate import MatrixStats, calibrate
from plrd_jax.transforms.decompositions import Decomposition, DecompositionError, decompose, decompose_factors, decomposed_factors, describe_scaling, output_errors, reduced_factors
from plrd_jax.transforms.factorize import factorize, reduce_rank, svd_factors
from plrd_jax.transforms.plan import RankPlan
from plrd_jax.transforms.decompositions import whitening

D_IN, D_OUT, N = 48, 40, 400


def activations(n=N, d=D_IN, seed=0):
    """Correlated inputs with a few outlier channels, like an LLM's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    x[:, :3] *= 20.0
    return x


def kernel(seed=1):
    return np.random.default_rng(seed).standard_normal((D_IN, D_OUT))


def stats_of(x, fisher_rows=None):
    fisher_rows = np.zeros(x.shape[1]) if fisher_rows is None else fisher_rows
    return MatrixStats(*(jnp.asarray(v, jnp.float32) for v in (x.T @ x, np.abs(x).sum(0), fisher_rows, len(x))))


def product(a, b):
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def output_error(x, k, a, b):
    return np.linalg.norm(x @ k - x @ product(a, b))


def scaled_reference(k, s, r):
    """diag(s)⁻¹ trunc_r(diag(s) K) in float64."""
    u, sig, vt = np.linalg.svd(s[:, None] * k, full_matrices=False)
    return (u[:, :r] * sig[:r]) @ vt[:r] / s[:, None]


def test_whitened_with_identity_second_moment_is_plain_svd():
    k = kernel()
    stats = MatrixStats(jnp.eye(D_IN), jnp.ones(D_IN), jnp.zeros(D_IN), jnp.asarray(1.0))
    a, b = decomposed_factors(jnp.asarray(k, jnp.float32), 12, "whitened", stats)
    a0, b0 = svd_factors(jnp.asarray(k, jnp.float32), 12)
    np.testing.assert_allclose(product(a, b), product(a0, b0), atol=1e-4 * np.abs(k).max())
    np.testing.assert_allclose(decompose(jnp.asarray(k), Decomposition("whitened"), stats).s,
                               np.linalg.svd(k, compute_uv=False), rtol=1e-5)


@pytest.mark.parametrize("r", [1, 8, 20, 39])
def test_whitened_output_error_is_the_dropped_whitened_spectrum_and_beats_svd(r):
    x, k = activations(), kernel()
    stats = stats_of(x, fisher_rows=np.random.default_rng(2).uniform(0.1, 2.0, D_IN))
    sigma = np.linalg.svd(np.linalg.cholesky(x.T @ x).T @ k, compute_uv=False)
    errors = {m: output_error(x, k, *decomposed_factors(jnp.asarray(k, jnp.float32), r, m, stats))
              for m in ("svd", "whitened", "asvd", "fisher")}
    np.testing.assert_allclose(errors["whitened"], np.sqrt(np.sum(sigma[r:] ** 2)), rtol=2e-3)
    assert all(errors["whitened"] <= e * (1 + 1e-4) for e in errors.values()), errors
    assert errors["whitened"] < 0.9 * errors["svd"]


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd", "fisher"])
def test_factors_are_balanced_and_plain_svd_factors_are_u_root_sigma(method):
    x, k = activations(), kernel()
    x = x * 50.0  # large activations: S⁻¹ would leave A's columns far smaller than B's rows
    stats = stats_of(x, fisher_rows=np.random.default_rng(2).uniform(0.1, 2.0, D_IN))
    a, b = decomposed_factors(jnp.asarray(k, jnp.float32), 10, method, stats)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)
    spectrum = decompose(jnp.asarray(k, jnp.float32), Decomposition(method), stats)
    unbalanced = (np.asarray(spectrum.left[:, :10]) * np.asarray(spectrum.s[:10])) @ np.asarray(spectrum.right[:10])
    np.testing.assert_allclose(product(a, b), unbalanced, atol=1e-5 * np.abs(unbalanced).max())
    if method == "svd":
        u, sig, vt = np.linalg.svd(k, full_matrices=False)
        sign = np.sign(np.sum(np.asarray(a) * u[:, :10], axis=0))  # singular vectors are unique up to sign
        np.testing.assert_allclose(np.asarray(a) * sign, u[:, :10] * np.sqrt(sig[:10]), atol=1e-4)
        np.testing.assert_allclose(np.asarray(b) * sign[:, None], np.sqrt(sig[:10])[:, None] * vt[:10], atol=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_asvd_is_the_svd_of_the_channel_scaled_kernel(alpha):
    x, k = activations(), kernel()
    a, b = decomposed_factors(jnp.asarray(k, jnp.float32), 10, Decomposition("asvd", alpha=alpha), stats_of(x))
    want = scaled_reference(k, np.abs(x).mean(0) ** alpha, 10)
    np.testing.assert_allclose(product(a, b), want, atol=2e-4 * np.abs(want).max())


def test_asvd_with_equal_channel_activity_is_plain_svd():
    k = kernel()
    stats = MatrixStats(jnp.eye(D_IN), jnp.full(D_IN, 3.0), jnp.zeros(D_IN), jnp.asarray(2.0))
    a, b = decomposed_factors(jnp.asarray(k, jnp.float32), 7, "asvd", stats)
    a0, b0 = svd_factors(jnp.asarray(k, jnp.float32), 7)
    np.testing.assert_allclose(product(a, b), product(a0, b0), atol=1e-4 * np.abs(k).max())


def test_fisher_weights_the_rows_by_root_fisher():
    x, k = activations(), kernel()
    fisher_rows = np.random.default_rng(3).uniform(0.01, 5.0, D_IN)
    a, b = decomposed_factors(jnp.asarray(k, jnp.float32), 9, "fisher", stats_of(x, fisher_rows))
    want = scaled_reference(k, np.sqrt(fisher_rows), 9)
    np.testing.assert_allclose(product(a, b), want, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd", "fisher"])
def test_factors_of_a_product_decompose_like_the_product(method):
    x = activations()
    rng = np.random.default_rng(4)
    a0, b0 = rng.standard_normal((D_IN, 24)), rng.standard_normal((24, D_OUT))
    stats = stats_of(x, rng.uniform(0.1, 2.0, D_IN))
    a, b = reduced_factors(jnp.asarray(a0, jnp.float32), jnp.asarray(b0, jnp.float32), 10, method, stats)
    a1, b1 = decomposed_factors(jnp.asarray(a0 @ b0, jnp.float32), 10, method, stats)
    want = product(a1, b1)
    np.testing.assert_allclose(product(a, b), want, atol=5e-4 * np.abs(want).max())


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd", "fisher"])
def test_output_errors_are_the_errors_of_every_truncation(method):
    x, k = activations(), kernel()
    stats = stats_of(x, np.random.default_rng(5).uniform(0.1, 2.0, D_IN))
    spectrum = decompose(jnp.asarray(k, jnp.float32), Decomposition(method), stats)
    errors = output_errors(spectrum, x.T @ x)
    assert errors.shape == (D_OUT + 1,) and errors[-1] == 0
    np.testing.assert_allclose(errors[0], np.linalg.norm(x @ k) ** 2, rtol=1e-4)
    for r in (3, 17, 30):
        a, b = decomposed_factors(jnp.asarray(k, jnp.float32), r, method, stats)
        np.testing.assert_allclose(errors[r], output_error(x, k, a, b) ** 2, rtol=2e-3)
    assert np.all(np.diff(errors) <= 0)


def test_whitening_factor_is_the_cholesky_factor():
    x = activations()
    scaling = whitening(jnp.asarray(x.T @ x, jnp.float32), damping=0.0)
    assert describe_scaling(scaling) == "cholesky (damping 0e+00)"
    ref = np.linalg.cholesky(x.T @ x).T
    np.testing.assert_allclose(scaling.forward, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(scaling.inverse, np.float64) @ np.asarray(scaling.forward, np.float64),
                               np.eye(D_IN), atol=1e-3)


def test_rank_deficient_second_moment_is_damped_and_still_beats_svd():
    x, k = activations(n=20), kernel()  # 20 tokens, 48 channels: XᵀX has rank 20
    stats = stats_of(x)
    spectrum = decompose(jnp.asarray(k, jnp.float32), Decomposition("whitened"), stats)
    assert describe_scaling(spectrum.scaling).startswith("cholesky")
    for r in (5, 15):
        whitened = output_error(x, k, *decomposed_factors(jnp.asarray(k, jnp.float32), r, "whitened", stats))
        plain = output_error(x, k, *svd_factors(jnp.asarray(k, jnp.float32), r))
        assert whitened < plain


def test_indefinite_second_moment_falls_back_to_eigh():
    h = np.diag([4.0, 1.0, -2.0, 0.5])  # not a second moment at all: every damped Cholesky fails
    scaling = whitening(jnp.asarray(h, jnp.float32))
    assert describe_scaling(scaling) == "eigh"
    sq = np.asarray(scaling.forward, np.float64).T @ np.asarray(scaling.forward, np.float64)
    np.testing.assert_allclose(np.diag(sq), [4.0, 1.0, 4e-6, 0.5], rtol=1e-4)  # -2 clamped at 1e-6 · 4
    np.testing.assert_allclose(np.asarray(scaling.inverse) @ np.asarray(scaling.forward), np.eye(4), atol=1e-5)


def test_damping_is_used_when_cholesky_fails():
    h = np.diag([1.0, 1.0, -1e-5, 1.0])  # slightly indefinite: λ = 1e-4 of the mean diagonal fixes it
    scaling = whitening(jnp.asarray(h, jnp.float32))
    assert describe_scaling(scaling) == "cholesky-damped (damping 1e-04)"


def test_decomposition_names_are_checked():
    with pytest.raises(DecompositionError, match="unknown decomposition 'qr'.*svd, whitened, asvd, fisher"):
        Decomposition("qr")
    with pytest.raises(DecompositionError, match="unknown decomposition"):
        RankPlan(rank=4, decomposition="qr")


# ---- on a model: factorize / reduce_rank -----------------------------------------------------------------
CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=32)
WINDOWS = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG)
    return params, calibrate(CONFIG, params, WINDOWS)


def layer_output_error(params, stats, path, reference):
    node = params
    for key in path.split("/"):
        node = node[key]
    k = np.asarray(node["A"], np.float64) @ np.asarray(node["B"], np.float64)
    diff = reference - k
    return float(np.sum(diff * (np.asarray(stats[path].xtx, np.float64) @ diff)))


def test_factorize_with_a_planned_decomposition(model):
    params, stats = model
    plan = RankPlan(("mlp",), rank=8, decomposition="whitened")
    whitened, config = factorize(params, plan, CONFIG, stats=stats)
    plain, _ = factorize(params, RankPlan(("mlp",), rank=8), CONFIG)
    assert config.linear("layers_0/mlp/up").rank == 8
    for path in ("layers_0/mlp/up", "layers_1/mlp/down"):
        dense = np.asarray(params[path.split("/")[0]]["mlp"][path.split("/")[2]]["kernel"], np.float64)
        assert layer_output_error(whitened, stats, path, dense) < layer_output_error(plain, stats, path, dense)
    # the argument wins over the plan; "svd" is exactly the plain path
    again, _ = factorize(params, plan, CONFIG, stats=stats, decomposition="svd")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), again, plain))


def test_reduce_rank_with_stats_is_the_decomposition_of_the_product(model):
    params, stats = model
    low, config = factorize(params, RankPlan(("attn",), rank=12), CONFIG)
    reduced, config = reduce_rank(low, {"layers_1/attn/q": 5}, config, stats=stats, decomposition="asvd")
    node = low["layers_1"]["attn"]["q"]
    a, b = decomposed_factors(node["A"] @ node["B"], 5, "asvd", stats["layers_1/attn/q"])
    got = reduced["layers_1"]["attn"]["q"]
    np.testing.assert_allclose(product(got["A"], got["B"]), product(a, b), atol=1e-4)
    assert config.linear("layers_1/attn/q").rank == 5


def test_factorize_under_jit(model):
    params, stats = model
    ranks = {"layers_0/mlp/gate": 6, "layers_1/attn/o": 4}
    jitted = jax.jit(lambda p, s: factorize(p, ranks, stats=s, decomposition="whitened")[0])(params, stats)
    eager, _ = factorize(params, ranks, stats=stats, decomposition="whitened")
    for path in ranks:
        a, b = path.split("/")[0], path.split("/", 1)[1].split("/")
        np.testing.assert_allclose(jitted[a][b[0]][b[1]]["A"], eager[a][b[0]][b[1]]["A"], atol=1e-5)


def test_missing_statistics_are_named(model):
    params, stats = model
    with pytest.raises(DecompositionError, match="'whitened' needs calibration statistics for layers_0/mlp/up"):
        factorize(params, {"layers_0/mlp/up": 4}, decomposition="whitened")
    with pytest.raises(DecompositionError, match="needs Fisher rows for layers_0/mlp/up.*fisher=True"):
        factorize(params, {"layers_0/mlp/up": 4}, decomposition="fisher", stats=stats)


# ---- the reference numbers of docs/methods.md §7 (HF transformers + torch, float64 whitening) -------------
@pytest.mark.slow
def test_reference_members_of_the_embedded_parent():
    """q, o, gate, up, down of all 30 layers at rank 256 (k, v dense); whitening from XᵀX over 32 × 512 tokens
    from token 150,000 of wiki.test.raw, jitter 1e-6 · mean diagonal; PPL on its first 8 × 512 tokens.
    torch: plain SVD 1.1e7, whitened 526."""
    from plrd_jax.data.corpora import load_documents
    from plrd_jax.data.windows import pack, tokenize
    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model("smollm2-135m")
    tokens = tokenize(load_documents("wikitext2-test"), tokenizer)
    windows = pack(tokens, 512)[:8]
    stats = calibrate(config, params, tokens[150_000:150_000 + 32 * 512].reshape(32, 512))
    paths = [p for p in config.matrix_paths() if p.rsplit("/", 1)[1] in ("q", "o", "gate", "up", "down")]
    ppl = {}
    for method in ("svd", "whitened"):
        member, member_config = factorize(params, {p: 256 for p in paths}, config, stats=stats,
                                          decomposition=Decomposition(method, damping=1e-6))
        ppl[method] = perplexity(member_config, member, windows, batch_size=4).ppl
    assert ppl["whitened"] == pytest.approx(526, rel=0.02)
    assert ppl["svd"] == pytest.approx(1.1e7, rel=0.1)


def test_whitening_leaves_no_gram_sized_arrays_for_the_cyclic_collector():
    """Eager whitening through its fallbacks frees every (d, d) temporary when it returns, without Python's cyclic
    garbage collector (a streamed 7B decomposition would otherwise keep ~1 GB per 11008-wide matrix)."""
    import gc

    import jax.numpy as jnp

    from plrd_jax.transforms.decompositions import describe_scaling, whitening

    d = 48
    x = np.random.default_rng(0).standard_normal((64, d)).astype(np.float32)
    gram = x.T @ x
    gram[0, 0] = -1.0  # not positive definite at any damping: every fallback runs, ending in eigh
    gc.collect()
    gc.disable()
    try:
        before = {id(a) for a in jax.live_arrays()}
        xtx = jnp.asarray(gram)
        scaling = whitening(xtx)
        kind = describe_scaling(scaling)
        del scaling, xtx
        left = [a.shape for a in jax.live_arrays() if id(a) not in before and a.shape == (d, d)]
    finally:
        gc.enable()
    assert kind == "eigh" and left == []
