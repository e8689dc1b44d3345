"""Calibration statistics against transformers' torch Llama: inputs captured by forward hooks, Fisher rows from
per-window weight gradients."""
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from plrd_jax.transforms.calibrate import MatrixStats, calibrate, linear_paths, stats_shardings
from plrd_jax.io.hf import load_hf
from plrd_jax.nn.sharding import make_mesh
from plrd_jax.transforms.factorize import factorize
from plrd_jax.transforms.plan import RankPlan

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
             num_attention_heads=4, num_key_value_heads=2)
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
WINDOWS = np.random.default_rng(0).integers(0, 64, (5, 12)).astype(np.int32)


def hf_module(model, path):
    if path == "lm_head":
        return model.lm_head
    layer, _, name = path.split("/")
    module = model.model.layers[int(layer.split("_")[1])]
    for attr in HF_NAMES[name].split("."):
        module = getattr(module, attr)
    return module


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)).eval()
    directory = tmp_path_factory.mktemp("hf")
    model.save_pretrained(directory)
    config, params = load_hf(directory)
    return model, config, params


def reference_stats(model, paths, windows):
    """Per path: Σ xxᵀ, Σ|x|, N and Σ_w Σ_j (∂L_w/∂K_ij)² from torch, float64."""
    inputs = {p: [] for p in paths}
    hooks = [hf_module(model, p).register_forward_hook(lambda m, args, out, p=p: inputs[p].append(args[0].detach()))
             for p in paths]
    fisher = {p: 0.0 for p in paths}
    for window in windows:
        model.zero_grad()
        tokens = torch.tensor(window[None].astype(np.int64))
        model(tokens, labels=tokens).loss.backward()
        for p in paths:  # weight (d_out, d_in) = Kᵀ: row i of K is column i of the weight
            fisher[p] = fisher[p] + (hf_module(model, p).weight.grad.double() ** 2).sum(0).numpy()
    for h in hooks:
        h.remove()
    out = {}
    for p in paths:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[p]]).double().numpy()
        out[p] = (x.T @ x, np.abs(x).sum(0), len(x), fisher[p])
    return out


def test_paths_are_every_linear(parent):
    _, config, params = parent
    shapes = linear_paths(config, params)
    assert list(shapes) == list(config.matrix_paths())
    assert all(shapes[p] == config.matrix_shape(p) for p in shapes)


@pytest.mark.parametrize("fisher", [False, True])
def test_stats_match_torch(parent, fisher):
    model, config, params = parent
    calls = []
    stats = calibrate(config, params, WINDOWS, batch_size=2, fisher=fisher, progress=lambda d, n: calls.append((d, n)))
    assert calls == [(2, 5), (4, 5), (5, 5)]  # the last batch is padded and its padding weighs nothing
    ref = reference_stats(model, list(stats), WINDOWS)
    for path, (xtx, abs_sum, n, fisher_rows) in ref.items():
        s = stats[path]
        assert s.xtx.dtype == np.float32 and float(s.tokens) == n == WINDOWS.size
        np.testing.assert_allclose(s.xtx, xtx, rtol=1e-4, atol=1e-5 * np.abs(xtx).max(), err_msg=path)
        np.testing.assert_allclose(s.abs_sum, abs_sum, rtol=1e-4, err_msg=path)
        np.testing.assert_allclose(s.second_moment, xtx / n, rtol=1e-4, atol=1e-5 * np.abs(xtx).max() / n)
        if fisher:
            np.testing.assert_allclose(s.fisher_rows, fisher_rows, rtol=2e-3, atol=1e-6 * fisher_rows.max(),
                                       err_msg=path)
        else:
            assert not np.any(s.fisher_rows)


def test_fisher_of_factorized_matrices_is_that_of_the_product(parent):
    """∂L/∂K is taken through the layer output, so factors A B calibrate like the dense K = A B."""
    _, config, params = parent
    low, low_config = factorize(params, RankPlan(("mlp",), rank=8), config)
    dense = jax.tree.map(lambda x: x, low)
    for i in range(config.num_layers):
        for name in ("gate", "up", "down"):
            node = dense[f"layers_{i}"]["mlp"][name]
            dense[f"layers_{i}"]["mlp"][name] = {"kernel": node["A"] @ node["B"]}
    a = calibrate(low_config, low, WINDOWS[:2], fisher=True)
    b = calibrate(config, dense, WINDOWS[:2], fisher=True)
    for path in a:
        np.testing.assert_allclose(a[path].fisher_rows, b[path].fisher_rows, rtol=2e-3,
                                   atol=1e-6 * float(b[path].fisher_rows.max()), err_msg=path)
        np.testing.assert_allclose(a[path].xtx, b[path].xtx, rtol=1e-4, atol=1e-5 * float(b[path].xtx.max()))


def test_stats_are_sharded_like_the_kernel_inputs(parent):
    _, config, params = parent
    mesh = make_mesh((1, -1, 1))
    stats = calibrate(config, params, WINDOWS[:2], mesh=mesh)
    want = stats_shardings(linear_paths(config, params), mesh)
    for path, s in stats.items():
        assert isinstance(s, MatrixStats)
        assert s.xtx.sharding.is_equivalent_to(want[path].xtx, 2)


@pytest.mark.parametrize("fisher", [False, True])
def test_paths_restrict_the_statistics_to_those_linears(parent, fisher):
    _, config, params = parent
    full = calibrate(config, params, WINDOWS[:3], batch_size=2, fisher=fisher)
    paths = ["layers_1/mlp/down", "layers_1/attn/q", "layers_1/attn/k"]
    some = calibrate(config, params, WINDOWS[:3], batch_size=2, fisher=fisher, paths=paths)
    assert set(some) == set(paths)
    for path, s in some.items():
        for got, want in zip(s, full[path]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()), err_msg=path)
    with pytest.raises(ValueError, match="no Linear at 'layers_7/attn/q'"):
        calibrate(config, params, WINDOWS[:2], paths=["layers_1/attn/q", "layers_7/attn/q"])
    with pytest.raises(ValueError, match="empty path list"):
        calibrate(config, params, WINDOWS[:2], paths=[])


def test_rejects_bad_windows(parent):
    _, config, params = parent
    with pytest.raises(ValueError, match="windows must be"):
        calibrate(config, params, np.zeros((3,), np.int32))


SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import init_params
from plrd_jax.nn.sharding import make_mesh
from plrd_jax.transforms.calibrate import calibrate
c = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                max_seq_len=16)
params = init_params(c, seed=1)
windows = np.random.default_rng(0).integers(0, 64, (8, 12))
sharded = calibrate(c, params, windows, mesh=make_mesh((1, 4, 1)))
single = calibrate(c, params, windows, mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
for path, s in sharded.items():
    d = s.xtx.shape[0]
    shapes = {tuple(x.data.shape) for x in s.xtx.addressable_shards}
    assert shapes == {(d // 4, d)}, (path, shapes)
    np.testing.assert_allclose(s.xtx, single[path].xtx, rtol=1e-5, atol=1e-5 * float(single[path].xtx.max()))
print("ok", len(sharded))
"""


def test_every_gram_is_split_over_fsdp_and_equals_the_single_device_one():
    """On 4 fsdp devices no device holds a whole XᵀX, row-parallel o and down included (their d_in is a tensor
    axis, unsplit under pure fsdp), and the sums equal one device's."""
    run = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["ok", "15"]


def test_stacked_params_give_the_per_layer_statistics(parent):
    """A scanned model's stacked params calibrate like its per-layer ones (torch reference as above)."""
    from plrd_jax.nn.layout import arrange_layers

    model, config, params = parent
    config, params = arrange_layers(config, params, scan=True)
    assert "layers" in params
    stats = calibrate(config, params, WINDOWS, batch_size=2)
    ref = reference_stats(model, list(stats), WINDOWS)
    assert sorted(stats) == sorted(config.matrix_paths())
    for path, (xtx, *_) in ref.items():
        np.testing.assert_allclose(stats[path].xtx, xtx, rtol=1e-4, atol=1e-5 * np.abs(xtx).max(), err_msg=path)
