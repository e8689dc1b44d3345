"""Streaming transforms: the streamed member equals the in-memory transform (numpy/jnp on the whole tree),
sharded checkpoints and bfloat16 are read right, bad checkpoints fail before any work, and the full LLaMA-2-7B
shapes check out under jax.eval_shape. The peak-RSS measurement is benchmarks/streaming_memory.py (slow)."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.io.hf import CheckpointError, config_to_hf, hf_state_dict, load_hf
from plrd_jax.nn.model import init_params
from plrd_jax.nn.accounting import count_params
from plrd_jax.io.store import load_member
from plrd_jax.nn.model import Decoder
from plrd_jax.io.checkpoint_reader import open_checkpoint, read_tensor
from plrd_jax.io.streaming import factorize_streamed, prune_streamed, reduce_streamed, streamed_ranks
from plrd_jax.nn.model import abstract_params
from plrd_jax.transforms.factorize import factorize, reduce_rank
from plrd_jax.transforms.plan import RankPlan, predict_param_count
from plrd_jax.transforms.plan import PlanError
from plrd_jax.transforms.prune import PruneError, prune

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=32, tie_embeddings=False)
LLAMA2_7B = ModelConfig()  # the defaults are LLaMA-2-7B's shapes


def write_sharded(state: dict, directory: Path, shards: int, dtype=None) -> Path:
    """An HF checkpoint split into `shards` files with a model.safetensors.index.json, as transformers writes."""
    directory.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (state[n] if dtype is None else state[n].astype(dtype)) for n in names[i::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_to_hf(CONFIG)))
    return directory


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    params = jax.tree.map(np.asarray, init_params(CONFIG, seed=3))
    path = write_sharded(hf_state_dict(params, CONFIG), tmp_path_factory.mktemp("hf") / "parent", shards=3)
    return path, params


def leaves(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_streamed_factorize_then_reduce_equal_the_in_memory_transforms(parent, tmp_path):
    path, params = parent
    plan = RankPlan(("attn", "mlp"), exclude=("re:.*/(k|v)",), rank=8)
    meta = factorize_streamed(path, plan, tmp_path / "fam", name="r8")
    config, streamed, stored = load_member(f"{tmp_path / 'fam'}:r8")
    expected, expected_config = factorize(params, plan, open_checkpoint(path).config)
    assert config == expected_config and stored == meta
    assert meta["params"] == count_params(expected) == predict_param_count(params, streamed_ranks(CONFIG, plan))
    a, b = leaves(streamed), leaves(expected)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)

    meta2 = reduce_streamed(tmp_path / "fam", "r8", {"layers_0/mlp/up": 4, "layers_1/attn/k": 8})
    config2, reduced, _ = load_member(f"{tmp_path / 'fam'}:1")
    expected2, expected_config2 = reduce_rank(expected, {"layers_0/mlp/up": 4, "layers_1/attn/k": 8}, expected_config)
    assert (meta2["member"], meta2["step"], config2) == (1, 1, expected_config2)
    a, b = leaves(reduced), leaves(expected2)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_streamed_prune_equals_prune_and_computes_the_masked_parent(parent, tmp_path):
    path, params = parent
    rng = np.random.default_rng(5)
    masks = {"z_layer": np.array([0.8, 1.0], np.float32),
             "z_head": np.array([[1.2, 0.7, 0, 0], [0, 0, 0.9, 1.1]], np.float32),  # one kv group per layer
             "z_int": np.where(rng.random((2, 80)) < 0.5, 0, rng.uniform(0.5, 1.5, (2, 80))).astype(np.float32),
             "z_hidden": np.where(np.arange(32) % 4 == 3, 0, rng.uniform(0.5, 1.5, 32)).astype(np.float32)}
    masks["z_int"][:, :40] = 0.0  # every layer keeps as many intermediate dims
    masks["z_int"][:, 40:] = np.where(masks["z_int"][:, 40:] == 0, 1.0, masks["z_int"][:, 40:])
    meta = prune_streamed(path, masks, tmp_path / "fam", name="pruned")
    config, streamed, _ = load_member(f"{tmp_path / 'fam'}:pruned")
    expected, expected_config = prune(params, CONFIG, masks)
    assert config == expected_config and (config.num_kv_heads, config.hidden_size, config.intermediate_size) == (1, 24, 40)
    assert meta["params"] == count_params(expected)
    a, b = leaves(streamed), leaves(expected)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 12)), jnp.int32)
    masked = Decoder(CONFIG).apply({"params": params}, tokens, masks={k: jnp.asarray(v) for k, v in masks.items()})
    np.testing.assert_allclose(Decoder(config).apply({"params": streamed}, tokens), masked, rtol=1e-4, atol=1e-4)

    dropped = {**masks, "z_layer": np.array([0.0, 1.0], np.float32)}  # layer 0's tensors are never read
    prune_streamed(path, dropped, tmp_path / "fam", name="one-layer")
    config, streamed, _ = load_member(f"{tmp_path / 'fam'}:one-layer")
    expected, expected_config = prune(params, CONFIG, dropped)
    assert config == expected_config and config.num_layers == 1
    a, b = leaves(streamed), leaves(expected)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_streamed_prune_with_bad_masks_fails_before_any_work(parent, tmp_path):
    path, _ = parent
    with pytest.raises(PruneError, match="z_int has shape"):
        prune_streamed(path, {"z_int": np.ones((2, 81), np.float32)}, tmp_path / "fam")
    with pytest.raises(PruneError, match="keep the same number"):
        prune_streamed(path, {"z_head": np.array([[1, 0, 1, 0], [1, 1, 0, 0]], np.float32)}, tmp_path / "fam")
    assert not (tmp_path / "fam").exists()


def test_bfloat16_shards_are_read_exactly(parent, tmp_path):
    _, params = parent
    state = hf_state_dict(params, CONFIG)
    path = write_sharded(state, tmp_path / "bf16", shards=2, dtype=ml_dtypes.bfloat16)
    source = open_checkpoint(path)
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(read_tensor(source.tensors[name]), state[name].astype(ml_dtypes.bfloat16))
    _, dense = load_hf(write_sharded(state, tmp_path / "f32", shards=2))
    streamed = dict(("/".join(k), v) for k, v in source.params())
    np.testing.assert_array_equal(streamed["layers_1/mlp/down/kernel"],
                                  np.asarray(dense["layers_1"]["mlp"]["down"]["kernel"]).astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    # A float32 member of the bfloat16 checkpoint: copied tensors stay bfloat16 on disk and come back exact.
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    factorize_streamed(path, {"layers_0/mlp/up": 8}, tmp_path / "fam")
    _, member, _ = load_member(f"{tmp_path / 'fam'}:0")
    expected, _ = factorize(rounded, {"layers_0/mlp/up": 8})
    a, b = leaves(member), leaves(expected)
    assert a.keys() == b.keys() and all(v.dtype == np.float32 for v in a.values())
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_shard_missing_from_the_index_fails_before_any_work(parent, tmp_path):
    path, _ = parent
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(path), str(broken)], check=True)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors listed in .* is missing"):
        factorize_streamed(broken, RankPlan(rank=4), tmp_path / "fam")
    assert not (tmp_path / "fam").exists()


def test_a_tensor_missing_or_misplaced_fails_before_any_work(parent, tmp_path):
    path, _ = parent
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(path), str(broken)], check=True)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    moved = "model.layers.0.mlp.up_proj.weight"
    index["weight_map"][moved] = "model-00001-of-00003.safetensors" if index["weight_map"][moved].startswith(
        "model-00002") else "model-00002-of-00003.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"places {moved} in .*, which does not hold it"):
        open_checkpoint(broken)
    subprocess.run(["cp", str(path / "model.safetensors.index.json"), str(broken)], check=True)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="lacks tensor model.layers.2"):
        open_checkpoint(broken)
    with pytest.raises(PlanError, match="energy plan"):
        factorize_streamed(path, RankPlan(energy=0.9), tmp_path / "fam")


def test_llama2_7b_shapes_under_eval_shape():
    """The full 32-layer LLaMA-2-7B, progressively to ranks 2048 → 1536 → 1216 (the PLRD preset), from shapes alone."""
    parent = abstract_params(LLAMA2_7B)
    assert count_params(parent) == 6_738_415_616  # LLaMA-2-7B's published parameter count
    member, config = parent, LLAMA2_7B
    for rank, factorized in ((2048, 32 * 3), (1536, 32 * 7), (1216, 32 * 7)):
        ranks = streamed_ranks(config, RankPlan(("attn", "mlp"), rank=rank))
        assert len(ranks) == factorized  # at 2048 the 4096 × 4096 attention matrices stay dense (break-even 2048)
        predicted = predict_param_count(member, ranks)
        member = jax.eval_shape(lambda p: reduce_rank(p, ranks)[0], member)
        config = config.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
        assert count_params(member) == predicted
        assert jax.tree.map(lambda x: x.shape, member) == jax.tree.map(lambda x: x.shape, abstract_params(config))
    assert count_params(member) == 3_300_659_200  # the paper's "3.3B" member
    assert member["layers_31"]["mlp"]["down"]["A"].shape == (11008, 1216)
    assert member["layers_0"]["attn"]["k"]["B"].shape == (1216, 4096)
    # Largest matrices in float32: embedding and LM head, 32000 × 4096 × 4 B = 524 MB each.
    sizes = sorted((x.size * 4 for x in jax.tree.leaves(parent)), reverse=True)
    assert sizes[:3] == [524_288_000, 524_288_000, 180_355_072]


def test_transform_sharded_equals_the_plain_transform(parent):
    from plrd_jax.nn.sharding import make_mesh
    from plrd_jax.io.streaming import transform_sharded

    _, params = parent
    ranks = {"layers_0/mlp/up": 8, "layers_1/attn/q": 4}
    sharded, config = transform_sharded(factorize, params, ranks, CONFIG, make_mesh())
    expected, expected_config = factorize(params, ranks, CONFIG)
    assert config == expected_config
    a, b = leaves(sharded), leaves(expected)
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _whitened_reference(kernel: np.ndarray, xtx: np.ndarray, r: int, damping: float = 1e-6):
    """numpy float64 SVD-LLM: L Lᵀ = XᵀX + λ·mean(diag)·I, K_r = L⁻ᵀ (LᵀK)_r, and the tail Σ_{i≥r} σ_i²."""
    h = np.asarray(xtx, np.float64)
    h = (h + h.T) / 2 + damping * np.mean(np.diag(h)) * np.eye(len(h))
    lower = np.linalg.cholesky(h)
    u, s, vt = np.linalg.svd(lower.T @ kernel.astype(np.float64), full_matrices=False)
    k_r = np.linalg.solve(lower.T, u[:, :r] * s[:r]) @ vt[:r]
    return k_r, float(np.sum(s[r:] ** 2))


def test_streamed_whitening_from_saved_statistics_matches_numpy_float64(parent, tmp_path):
    """Calibrate, save the statistics, stream a whitened member reading them back memory-mapped: each matrix is
    SVD-LLM's rank-r truncation (numpy float64) and its output error ‖X(K − AB)‖² is the closed-form tail."""
    from plrd_jax.io.stats import load_stats, save_stats
    from plrd_jax.transforms.calibrate import calibrate

    path, params = parent
    windows = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (6, 32))
    stats = calibrate(CONFIG, params, windows, batch_size=3)
    save_stats(stats, tmp_path / "stats")
    files = load_stats(tmp_path / "stats")
    assert set(files) == set(stats) and isinstance(files["layers_0/mlp/down"].xtx, np.memmap)
    np.testing.assert_array_equal(files["layers_1/attn/q"].xtx, np.asarray(stats["layers_1/attn/q"].xtx))

    plan = RankPlan(("attn", "mlp"), exclude=("re:.*/(k|v)",), rank=8)
    meta = factorize_streamed(path, plan, tmp_path / "fam", decomposition="whitened", stats=files)
    _, member, _ = load_member(f"{tmp_path / 'fam'}:0")
    report = meta["decomposition_report"]
    assert report["scalings"] == {"cholesky (damping 1e-06)": len(meta["ranks"])} and report["fallbacks"] == {}
    for p in meta["ranks"]:
        layer, kind, name = p.split("/")
        node = member[layer][kind][name]
        product = np.asarray(node["A"], np.float64) @ np.asarray(node["B"], np.float64)
        kernel = np.asarray(params[layer][kind][name]["kernel"], np.float64)
        xtx = np.asarray(stats[p].xtx, np.float64)
        expected, tail = _whitened_reference(kernel, xtx, 8)
        np.testing.assert_allclose(product, expected, atol=1e-4 * np.abs(kernel).max(), err_msg=p)
        diff = kernel - product
        assert np.trace(diff.T @ xtx @ diff) == pytest.approx(tail, rel=2e-3, abs=1e-6 * np.trace(kernel.T @ xtx @ kernel))


def test_streamed_whitening_reports_fallbacks_and_missing_statistics_fail_first(parent, tmp_path):
    from plrd_jax.transforms.calibrate import MatrixStats
    from plrd_jax.transforms.decompositions import DecompositionError, describe_fallbacks

    path, _ = parent
    plan = {"layers_0/mlp/up": 8, "layers_1/mlp/down": 8}
    eye = {p: np.eye(CONFIG.matrix_shape(p)[0], dtype=np.float32) for p in plan}
    stats = {"layers_0/mlp/up": MatrixStats(eye["layers_0/mlp/up"], *np.zeros((3, 1), np.float32)),
             # not positive definite at any damping: whitening falls back to the eigendecomposition
             "layers_1/mlp/down": MatrixStats(-eye["layers_1/mlp/down"], *np.zeros((3, 1), np.float32))}
    with pytest.raises(DecompositionError, match="no calibration statistics for 1 matrices"):
        factorize_streamed(path, plan, tmp_path / "fam", decomposition="whitened",
                           stats={"layers_0/mlp/up": stats["layers_0/mlp/up"]})
    with pytest.raises(DecompositionError, match="inputs of width 32, its kernel takes 80"):
        factorize_streamed(path, plan, tmp_path / "fam", decomposition="whitened",
                           stats={**stats, "layers_1/mlp/down": stats["layers_0/mlp/up"]})
    with pytest.raises(DecompositionError, match="needs Fisher rows"):
        factorize_streamed(path, plan, tmp_path / "fam", decomposition="fisher", stats=stats)
    assert not (tmp_path / "fam").exists()
    seen = []
    meta = factorize_streamed(path, plan, tmp_path / "fam", decomposition="whitened", stats=stats,
                              progress=lambda info: seen.append(info.get("scaling")))
    report = meta["decomposition_report"]
    assert report["fallbacks"] == {"layers_1/mlp/down": "eigh"}
    assert report["scalings"] == {"cholesky (damping 1e-06)": 1, "eigh": 1}
    assert [s for s in seen if s] == ["cholesky (damping 1e-06)", "eigh"]
    assert describe_fallbacks(report) == "whitening fell back on 1 of 2 matrices: layers_1/mlp/down eigh"
