"""Sequential compression against one-pass compression and against statistics recomputed by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.transforms.sequential as sequential
from plrd_jax import ModelConfig, init_params
from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.nn.linears import Linear
from plrd_jax.nn.model import Block, Decoder
from plrd_jax.transforms.sequential import layer_groups, sequential_compress
from plrd_jax.transforms.factorize import reduce_rank
from plrd_jax.transforms.plan import RankPlan, resolve_ranks
from plrd_jax.transforms.compress import compress
from plrd_jax.transforms.plan import PlanError

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                     max_seq_len=32)
PLAN = RankPlan(("attn", "mlp", "lm_head"), fraction=0.4, decomposition="whitened")
WINDOWS = np.random.default_rng(0).integers(0, 64, (6, 16)).astype(np.int32)  # 96 tokens > every d_in


def product(node):
    return np.asarray(node["A"], np.float64) @ np.asarray(node["B"], np.float64)


def node_at(params, path):
    for key in path.split("/"):
        params = params[key]
    return params


@pytest.fixture(scope="module")
def runs():
    """One-pass and sequential compression of the same random model; the statistics and the (params, config)
    every sequential calibration saw are recorded."""
    params = init_params(CONFIG, 0)
    ranks = resolve_ranks(params, PLAN)
    one_stats = calibrate(CONFIG, params, WINDOWS)
    one, one_config, _ = compress(params, PLAN, CONFIG, stats=one_stats)
    calls = []

    def recording(config, p, windows, batch_size=4, **kw):
        stats = calibrate(config, p, windows, batch_size, **kw)
        calls.append({"config": config, "params": p, "paths": list(kw["paths"]), "stats": stats})
        return stats

    progress = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sequential, "calibrate", recording)
        seq, seq_config = sequential_compress(params, CONFIG, WINDOWS, ranks, "whitened", batch_size=4,
                                              progress=lambda d, n: progress.append((d, n)))
    return dict(params=params, ranks=ranks, one=one, one_config=one_config, one_stats=one_stats, seq=seq,
                seq_config=seq_config, calls=calls, progress=progress)


def test_groups_run_layer_by_layer_then_the_head(runs):
    assert [c["paths"] for c in runs["calls"]] == [paths for _, paths in layer_groups(runs["ranks"])]
    assert [g for g, _ in layer_groups(runs["ranks"])] == ["layers_0", "layers_1", "layers_2", "rest"]
    assert runs["calls"][-1]["paths"] == ["lm_head"]
    assert runs["progress"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert runs["seq_config"] == runs["one_config"]  # the same ranks
    groups = layer_groups(runs["ranks"])
    for i, call in enumerate(runs["calls"]):  # calibration i sees groups < i compressed and the rest as given
        compressed = {p for p, s in call["config"].linears if s.kind == "lowrank"}
        assert compressed == {p for _, paths in groups[:i] for p in paths}


def test_layer_0_is_that_of_one_pass_compression(runs):
    for path in runs["ranks"]:
        if path.startswith("layers_0/"):
            np.testing.assert_array_equal(runs["calls"][0]["stats"][path].xtx, runs["one_stats"][path].xtx)
            for name in ("A", "B"):
                np.testing.assert_array_equal(node_at(runs["seq"], path)[name], node_at(runs["one"], path)[name],
                                              err_msg=path)


def inputs_of(config, params, windows):
    """path -> the input (N·T, d_in) of every Linear, and the output (N·T, d) of every Block, by interceptor."""
    linears, blocks = {}, {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, Linear):
            linears["/".join(context.module.path)] = args[0]
        if context.method_name == "__call__" and isinstance(context.module, Block):
            blocks[context.module.path[-1]] = out[0]
        return out

    with nn.intercept_methods(interceptor):
        Decoder(config.replace(scan_layers=False)).apply({"params": params}, jnp.asarray(windows))
    flat = lambda x: np.asarray(x, np.float64).reshape(-1, x.shape[-1])  # noqa: E731
    return {p: flat(x) for p, x in linears.items()}, {p: flat(x) for p, x in blocks.items()}


def test_layer_1_statistics_are_those_of_the_compressed_layer_0_outputs(runs):
    params, seq = runs["params"], runs["seq"]
    # the model layer 1 was calibrated on: layer 0 as the sequential result, layers 1.. as given
    partial = {**params, "layers_0": seq["layers_0"]}
    partial_config = CONFIG.with_linears({p: s for p, s in runs["seq_config"].linears if p.startswith("layers_0/")})
    call = runs["calls"][1]
    assert call["config"] == partial_config
    jax.tree.map(np.testing.assert_array_equal, call["params"], partial)
    linears, blocks = inputs_of(partial_config, partial, WINDOWS)
    # by hand from the compressed layer 0's output h: x = RMSNorm(h) · scale, float64
    h = blocks["layers_0"]
    x = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + CONFIG.rms_norm_eps)
    x = x * np.asarray(params["layers_1"]["attn_norm"]["scale"], np.float64)
    stats = call["stats"]
    assert set(stats) == {p for p in runs["ranks"] if p.startswith("layers_1/")}
    for path in ("layers_1/attn/q", "layers_1/attn/k", "layers_1/attn/v"):
        np.testing.assert_allclose(stats[path].xtx, x.T @ x, rtol=1e-4, atol=1e-5 * np.abs(x.T @ x).max())
        assert float(stats[path].tokens) == WINDOWS.size
    for path, s in stats.items():  # every matrix of layer 1, on its input in that model
        xx = linears[path].T @ linears[path]
        np.testing.assert_allclose(s.xtx, xx, rtol=1e-4, atol=1e-5 * np.abs(xx).max(), err_msg=path)
        np.testing.assert_allclose(s.abs_sum, np.abs(linears[path]).sum(0), rtol=1e-4, err_msg=path)
        # and not the one-pass statistics (the uncompressed layer 0's outputs)
        one = np.asarray(runs["one_stats"][path].xtx, np.float64)
        assert np.abs(xx - one).max() > 1e-3 * np.abs(one).max(), path


def whitened_error(xtx, delta):
    """‖X Δ‖_F from XᵀX, float64."""
    return np.sqrt(max(np.trace(delta.T @ xtx @ delta), 0.0))


def test_each_matrix_attains_the_dropped_whitened_spectrum_on_its_sequential_inputs(runs):
    """‖X_i (K − K')‖_F = √(Σ_{j≥r} σ_j²) of Lᵀ K, L Lᵀ = X_iᵀ X_i, X_i the inputs sequential calibration
    saw; and no other rank-r matrix does better there, the one-pass factors included."""
    checked = 0
    for call in runs["calls"]:
        for path, s in call["stats"].items():
            xtx = np.asarray(s.xtx, np.float64)
            kernel = np.asarray(node_at(runs["params"], path)["kernel"], np.float64)
            r = runs["ranks"][path]
            sigma = np.linalg.svd(np.linalg.cholesky(xtx).T @ kernel, compute_uv=False)
            dropped = np.sqrt(np.sum(sigma[r:] ** 2))
            error = whitened_error(xtx, kernel - product(node_at(runs["seq"], path)))
            np.testing.assert_allclose(error, dropped, rtol=1e-6, err_msg=path)
            one_pass = whitened_error(xtx, kernel - product(node_at(runs["one"], path)))
            assert error <= one_pass * (1 + 1e-5), path
            if not path.startswith("layers_0/"):
                assert error < one_pass * (1 - 1e-4), path  # the inputs moved, so the one-pass fit is off
            checked += 1
    assert checked == len(runs["ranks"])


@pytest.mark.parametrize("method", ["asvd", "fisher"])
def test_other_decompositions_take_their_statistics_sequentially(runs, method):
    params = runs["params"]
    chosen = ("layers_0/attn/q", "layers_0/mlp/up", "layers_1/mlp/down")
    ranks = {p: r for p, r in runs["ranks"].items() if p in chosen}
    stats = calibrate(CONFIG, params, WINDOWS[:3], fisher=method == "fisher")
    one, _ = reduce_rank(params, ranks, CONFIG, stats=stats, decomposition=method)
    seq, seq_config = sequential_compress(params, CONFIG, WINDOWS[:3], ranks, method)
    assert {p: s.rank for p, s in seq_config.linears} == ranks
    for path in ranks:
        got, want = product(node_at(seq, path)), product(node_at(one, path))
        if path.startswith("layers_0/"):  # the same inputs (and, for Fisher, the same uncompressed model after)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=path)
        else:
            assert np.abs(got - want).max() > 1e-4 * np.abs(want).max(), path


def test_plain_svd_needs_no_calibration_and_is_one_pass(runs, monkeypatch):
    monkeypatch.setattr(sequential, "calibrate", lambda *a, **k: pytest.fail("svd calibrated"))
    got, got_config = sequential_compress(runs["params"], CONFIG, WINDOWS, runs["ranks"], "svd")
    want, want_config = reduce_rank(runs["params"], runs["ranks"], CONFIG)
    assert got_config == want_config
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_rejects_unknown_matrices_and_too_high_ranks(runs):
    with pytest.raises(PlanError, match="not a matrix"):
        sequential_compress(runs["params"], CONFIG, WINDOWS, {"layers_9/attn/q": 4})
    with pytest.raises(PlanError, match="exceeds"):
        sequential_compress(runs["params"], CONFIG, WINDOWS, {"layers_0/attn/k": 17})


def test_compress_command_sequential_and_multi_corpus(tmp_path):
    """`compress --sequential` gives one-pass's layer 0 and a different layer 1 (its statistics come from the
    compressed layer 0); the member's PPL is stored per evaluation corpus beside the parent's."""
    import numpy as np

    from plrd_jax.cli import main
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.io.hf import save_hf
    from plrd_jax.nn.model import init_params
    from plrd_jax.io.store import load_member
    from test_hf import small_tokenizer

    tokenizer = small_tokenizer(full_byte_alphabet=True)
    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    save_hf(init_params(config, seed=0), config, tmp_path / "parent", tokenizer=tokenizer)
    (tmp_path / "calib.txt").write_text("the cat sat on the mat while the dog slept by the door. " * 40)
    (tmp_path / "eval.txt").write_text("a bird sang in the tall tree near the quiet river bank. " * 20)
    (tmp_path / "other.txt").write_text("def f(x):\n    return x * 2  # doubles its argument\n" * 20)
    common = ["compress", "--model", str(tmp_path / "parent"), "--reduction", "0.3", "--multiple-of", "1",
              "--calibration-data", str(tmp_path / "calib.txt"), "--calibration-windows", "4",
              "--calibration-seq-len", "32", "--eval-data", f"{tmp_path / 'eval.txt'},{tmp_path / 'other.txt'}",
              "--eval-seq-len", "32", "--eval-tokens", "128", "--out", str(tmp_path / "members")]
    assert main(common) == 0
    assert main(common + ["--sequential"]) == 0
    _, one_pass, meta = load_member(f"{tmp_path / 'members'}:0")
    _, sequential, meta_seq = load_member(f"{tmp_path / 'members'}:1")
    assert meta_seq["decomposition_report"]["sequential"] and "sequential" in meta_seq["name"]
    np.testing.assert_allclose(sequential["layers_0"]["attn"]["q"]["A"], one_pass["layers_0"]["attn"]["q"]["A"],
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(sequential["layers_1"]["mlp"]["up"]["A"], one_pass["layers_1"]["mlp"]["up"]["A"],
                           atol=1e-4)
    assert set(meta["ppl_after"]) == set(meta["parent_ppl"]) == {str(tmp_path / "eval.txt"),
                                                                  str(tmp_path / "other.txt")}
    assert meta["unseen"] == [str(tmp_path / "eval.txt"), str(tmp_path / "other.txt")]
    assert main(common + ["--sequential", "--decomposition", "svd"]) == 2
