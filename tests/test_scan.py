"""Layers under jax.lax.scan (ModelConfig.scan_layers) compute what the unrolled decoder computes: logits,
gradients, masked (Sheared) forwards and KV-cache decoding, for uniform and per-layer-different members."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.nn.model import Decoder, init_cache, init_params, layer_runs

BASE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=5, num_heads=4, num_kv_heads=2,
                   max_seq_len=32)
UNIFORM = BASE.with_linears({f"layers_{i}/{m}": LinearSpec("lowrank", rank=6)
                             for i in range(5) for m in ("attn/q", "attn/o", "mlp/up")})
MIXED = BASE.with_linears({f"layers_{i}/mlp/down": LinearSpec("lowrank", rank=4 + (i >= 3)) for i in range(5)})
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)


def test_runs_group_layers_of_identical_specs():
    assert layer_runs(BASE) == layer_runs(UNIFORM) == [(0, 5)]
    assert layer_runs(MIXED) == [(0, 3), (3, 5)]
    assert layer_runs(BASE.with_linears({"layers_2/attn/k": LinearSpec("lowrank", rank=3)})) == [(0, 2), (2, 3),
                                                                                                 (3, 5)]


@pytest.mark.parametrize("config", [BASE, UNIFORM, MIXED, UNIFORM.replace(remat="full")], ids=["dense", "uniform",
                                                                                               "mixed", "remat"])
def test_scanned_logits_and_gradients_equal_unrolled(config):
    params = init_params(config, 1)

    def loss(p, scan):
        return Decoder(config.replace(scan_layers=scan)).apply({"params": p}, TOKENS).mean()
    scale = float(jnp.abs(Decoder(config).apply({"params": params}, TOKENS)).max())
    a, b = (Decoder(config.replace(scan_layers=s)).apply({"params": params}, TOKENS) for s in (True, False))
    assert float(jnp.abs(a - b).max()) <= 1e-5 * scale
    ga, gb = (jax.grad(loss)(params, s) for s in (True, False))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * (float(jnp.abs(y).max()) + 1e-6)


def test_masks_and_cache_run_under_scan():
    params = init_params(MIXED, 2)
    rng = np.random.default_rng(1)
    masks = {"z_layer": jnp.asarray(rng.uniform(size=5), jnp.float32),
             "z_head": jnp.asarray(rng.uniform(size=(5, 4)), jnp.float32),
             "z_int": jnp.asarray(rng.uniform(size=(5, 48)), jnp.float32),
             "z_hidden": jnp.asarray(rng.uniform(size=32), jnp.float32)}
    a, b = (Decoder(MIXED.replace(scan_layers=s)).apply({"params": params}, TOKENS, masks=masks) for s in (1, 0))
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())
    outs = []
    for scan in (True, False):
        model, cache = Decoder(MIXED.replace(scan_layers=scan)), init_cache(MIXED, 2, 16)
        logits, cache = model.apply({"params": params}, TOKENS[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)),
                                    cache)
        step, cache = model.apply({"params": params}, TOKENS[:, 8:9], jnp.full((2, 1), 8), cache)
        outs.append((logits, step, cache[4]["k"]))
    for x, y in zip(*outs):
        assert x.shape == y.shape and float(jnp.abs(x - y).max()) <= 1e-5 * (float(jnp.abs(y).max()) + 1e-6)
