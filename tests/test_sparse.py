"""Sparse-plus-low-rank members: the forward pass equals the dense reconstruction A B + S, the support is the
top of the residual, and the parameter count includes values and indices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax import Decoder, ModelConfig, count_params, init_params
from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.nn.linears import sltrain_matmul
from plrd_jax.transforms.plan import PlanError
from plrd_jax.transforms.allocate import allocate_ranks
from plrd_jax.transforms.sparse import residual_support, sparse_plus_lowrank, sparse_plus_lowrank_size

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
RANKS = {"layers_0/attn/q": 8, "layers_0/mlp/up": 12, "layers_1/mlp/down": 16}


@pytest.fixture(scope="module")
def parent():
    params = init_params(CONFIG, seed=1)
    return params, calibrate(CONFIG, params, np.asarray(TOKENS))


def node(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


def reconstruction(n, d_in, d_out):
    """A B + S in float64, S scattered with numpy."""
    s = np.zeros(d_in * d_out)
    s[np.asarray(n["indices"])] = np.asarray(n["values"], np.float64)
    return np.asarray(n["A"], np.float64) @ np.asarray(n["B"], np.float64) + s.reshape(d_in, d_out)


@pytest.mark.parametrize("support", ["residual", "activation", "random"])
def test_forward_equals_the_dense_reconstruction(parent, support):
    params, stats = parent
    member, config = sparse_plus_lowrank(params, RANKS, CONFIG, density=0.05, support=support,
                                         decomposition="whitened", stats=stats)
    dense = jax.tree.map(lambda x: x, params)
    for path in RANKS:
        d_in, d_out = CONFIG.matrix_shape(path)
        spec = config.linear(path)
        assert (spec.kind, spec.rank, spec.nnz, spec.alpha) == ("sltrain", RANKS[path], int(0.05 * d_in * d_out),
                                                                  float(RANKS[path]))
        keys = path.split("/")
        node(dense, "/".join(keys[:-1]))[keys[-1]] = {
            "kernel": jnp.asarray(reconstruction(node(member, path), d_in, d_out), jnp.float32)}
    ours = Decoder(config).apply({"params": member}, TOKENS)
    want = Decoder(CONFIG).apply({"params": dense}, TOKENS)
    np.testing.assert_allclose(ours, want, atol=2e-5 * float(jnp.abs(want).max()))


def test_gather_path_never_forms_the_dense_matrix(parent):
    params, _ = parent
    member, _ = sparse_plus_lowrank(params, {"layers_0/mlp/up": 12}, density=0.05)
    n = node(member, "layers_0/mlp/up")
    x = jax.random.normal(jax.random.key(0), (3, 5, 64))
    fn = lambda x: sltrain_matmul(x, n["A"], n["B"], n["values"], n["indices"], 1.0, "gather")
    shapes = {tuple(v.aval.shape) for eqn in jax.make_jaxpr(fn)(x).jaxpr.eqns for v in eqn.outvars}
    assert (64, 96) not in shapes and (64 * 96,) not in shapes
    np.testing.assert_allclose(fn(x), np.asarray(x, np.float64) @ reconstruction(n, 64, 96), atol=1e-5)


def test_members_apply_s_by_gather_and_never_form_a_dense_matrix(parent):
    params, _ = parent
    ranks = {f"layers_{i}/mlp/{name}": 12 for i in range(2) for name in ("gate", "up")}  # every 64 × 96 matrix
    member, config = sparse_plus_lowrank(params, ranks, CONFIG, density=0.05)

    def program(cfg):  # every tensor type in the lowered forward
        return jax.jit(lambda p: Decoder(cfg).apply({"params": p}, TOKENS)).lower(member).as_text()

    assert config.sparse_method == "gather"
    assert "64x96" not in program(config) and "6144x" not in program(config)
    auto = config.replace(sparse_method="auto")
    assert "tensor<64x96xf32>" in program(auto)  # 32 tokens: "auto" takes the dense temporary
    np.testing.assert_allclose(Decoder(config).apply({"params": member}, TOKENS),
                               Decoder(auto).apply({"params": member}, TOKENS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown sparse method"):
        config.replace(sparse_method="dense")


def test_top_residual_support_keeps_the_largest_entries(parent):
    params, _ = parent
    path = "layers_1/mlp/down"
    member, _ = sparse_plus_lowrank(params, {path: 16}, density=0.1)
    n = node(member, path)
    kernel = np.asarray(node(params, path)["kernel"], np.float64)
    residual = kernel - np.asarray(n["A"], np.float64) @ np.asarray(n["B"], np.float64)
    nnz = int(0.1 * residual.size)
    top = np.sort(np.argsort(-np.abs(residual).reshape(-1))[:nnz])
    np.testing.assert_array_equal(n["indices"], top)
    assert n["indices"].dtype == jnp.int32
    np.testing.assert_allclose(n["values"], residual.reshape(-1)[top], atol=1e-6)
    error = np.linalg.norm(kernel - reconstruction(n, *kernel.shape))
    np.testing.assert_allclose(error, np.sqrt(np.sum(residual ** 2) - np.sum(residual.reshape(-1)[top] ** 2)),
                               rtol=1e-4)


def test_random_support_is_seeded_sorted_and_unique():
    r = jnp.ones((20, 30))
    a, b = residual_support(r, 50, "random", seed=3), residual_support(r, 50, "random", seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 50 and np.all(np.diff(np.asarray(a)) > 0)


def test_parameter_count_includes_values_and_indices(parent):
    params, _ = parent
    member, _ = sparse_plus_lowrank(params, RANKS, density=0.03)
    saved = sum(np.prod(CONFIG.matrix_shape(p)) - sparse_plus_lowrank_size(*CONFIG.matrix_shape(p), r, 0.03)
                for p, r in RANKS.items())
    assert count_params(member) == count_params(params) - saved
    q = node(member, "layers_0/attn/q")
    assert q["values"].size == q["indices"].size == int(0.03 * 64 * 64)


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_allocation_with_sparse_overhead_meets_the_budget(parent, allocation):
    params, stats = parent
    budget = int(0.75 * count_params(params))
    result = allocate_ranks(params, budget, allocation, sparse_density=0.02, stats=stats, decomposition="whitened")
    member, _ = sparse_plus_lowrank(params, result.ranks, density=0.02, decomposition="whitened", stats=stats)
    assert count_params(member) == result.params and abs(result.params - budget) <= 0.01 * budget


def test_errors(parent):
    params, stats = parent
    with pytest.raises(PlanError, match="density must lie strictly between 0 and 1"):
        sparse_plus_lowrank(params, RANKS, density=0.0)
    with pytest.raises(PlanError, match="support 'activation' needs calibration statistics for layers_0/attn/q"):
        sparse_plus_lowrank(params, RANKS, support="activation")
    from plrd_jax.transforms.factorize import factorize
    low, _ = factorize(params, {"layers_0/attn/q": 8})
    with pytest.raises(PlanError, match="layers_0/attn/q is already factorized"):
        sparse_plus_lowrank(low, {"layers_0/attn/q": 4})


def test_compress_command_builds_a_sparse_plus_lowrank_member_within_budget(tmp_path):
    from plrd_jax.cli import main
    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model
    from test_hf import small_tokenizer

    tokenizer = small_tokenizer(full_byte_alphabet=True)
    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    params = init_params(config, seed=0)
    save_hf(params, config, tmp_path / "parent", tokenizer=tokenizer)
    (tmp_path / "calib.txt").write_text("the cat sat on the mat while the dog slept by the door. " * 40)
    (tmp_path / "eval.txt").write_text("a bird sang in the tall tree near the quiet river bank. " * 20)
    code = main(["compress", "--model", str(tmp_path / "parent"), "--reduction", "0.3", "--sparse-density", "0.05",
                 "--decomposition", "whitened", "--multiple-of", "1", "--calibration-data", str(tmp_path / "calib.txt"),
                 "--calibration-windows", "4", "--calibration-seq-len", "32", "--eval-data", str(tmp_path / "eval.txt"),
                 "--eval-seq-len", "32", "--eval-tokens", "128", "--out", str(tmp_path / "members")])
    assert code == 0
    member_config, member, _ = load_model(f"{tmp_path / 'members'}:0")
    kinds = {spec.kind for _, spec in member_config.linears}
    assert kinds == {"sltrain"} and member_config.sparse_method == "gather"
    assert abs(count_params(member) - 0.7 * count_params(params)) <= 0.01 * 0.7 * count_params(params)
    logits = Decoder(member_config).apply({"params": member}, jnp.ones((1, 8), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()
    assert main(["compress", "--model", str(tmp_path / "parent"), "--reduction", "0.3", "--sparse-density", "1.5",
                 "--calibration-data", str(tmp_path / "calib.txt"), "--eval-data", str(tmp_path / "eval.txt")]) == 2
