"""Layers under jax.lax.scan (ModelConfig.scan_layers) compute what the unrolled decoder computes: logits,
gradients, masked (Sheared) forwards and KV-cache decoding, for uniform and per-layer-different members."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.nn.layout import layer_runs
from plrd_jax.nn.model import Decoder, init_cache, init_params

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


# The stacked layout: one `layers` subtree with a leading layer axis (what a scanned decoder stores).

def test_stacked_params_compute_what_per_layer_params_compute():
    from plrd_jax.nn.layout import stack_layers, unstack_layers

    config = UNIFORM.replace(scan_layers=True)
    per_layer = init_params(UNIFORM, 3)
    stacked = stack_layers(per_layer, config)
    assert set(stacked) == {"embed", "layers", "final_norm", "lm_head"}
    assert stacked["layers"]["attn"]["q"]["A"].shape == (5, 32, 6)
    np.testing.assert_array_equal(stacked["layers"]["mlp"]["down"]["kernel"][3],
                                  per_layer["layers_3"]["mlp"]["down"]["kernel"])
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(per_layer)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(per_layer)):
        np.testing.assert_array_equal(x, y)

    def loss(p, c):
        return Decoder(c).apply({"params": p}, TOKENS).mean()
    a, b = (Decoder(c).apply({"params": p}, TOKENS) for p, c in ((stacked, config), (per_layer, UNIFORM)))
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())
    ga = unstack_layers(jax.grad(loss)(stacked, config))  # gradients come out stacked as well
    gb = jax.grad(loss)(per_layer, UNIFORM)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * (float(jnp.abs(y).max()) + 1e-6)
    # decoding with a KV cache on stacked params
    model, cache = Decoder(config), init_cache(config, 2, 16)
    logits, cache = model.apply({"params": stacked}, TOKENS[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), cache)
    step, _ = model.apply({"params": stacked}, TOKENS[:, 8:9], jnp.full((2, 1), 8), cache)
    full = Decoder(UNIFORM).apply({"params": per_layer}, TOKENS[:, :9])
    assert float(jnp.abs(step[:, 0] - full[:, 8]).max()) <= 1e-4 * float(jnp.abs(full).max())


def test_init_and_layout_follow_the_config():
    from plrd_jax.nn.layout import arrange_layers, stack_layers, stores_stacked
    from plrd_jax.nn.model import abstract_params

    assert stores_stacked(UNIFORM.replace(scan_layers=True)) and not stores_stacked(UNIFORM)
    assert not stores_stacked(MIXED.replace(scan_layers=True))  # two runs of layers: per layer, stacked in-step
    assert abstract_params(UNIFORM.replace(scan_layers=True))["layers"]["mlp"]["up"]["B"].shape == (5, 6, 48)
    assert "layers_4" in abstract_params(MIXED.replace(scan_layers=True))
    with pytest.raises(ValueError, match="layers 2 and 3 differ"):
        stack_layers(init_params(MIXED), MIXED)
    config, params = arrange_layers(MIXED, init_params(MIXED), scan=True)
    assert not config.scan_layers and "layers_0" in params
    config, params = arrange_layers(UNIFORM, init_params(UNIFORM), scan=True)
    assert config.scan_layers and "layers" in params
    config, params = arrange_layers(config, params, scan=False)
    assert not config.scan_layers and "layers_4" in params


def test_stacked_shardings_and_weight_decay_are_the_per_layer_ones_with_a_layer_axis():
    from plrd_jax.nn.layout import stack_layers
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.optim import decay_mask

    per_layer = init_params(UNIFORM)
    stacked = stack_layers(per_layer, UNIFORM.replace(scan_layers=True))
    mesh = make_mesh()
    a, b = param_shardings(stacked, mesh), param_shardings(per_layer, mesh)
    for key in ("attn/q/A", "attn/q/B", "mlp/down/kernel", "attn_norm/scale"):
        node_a, node_b = a["layers"], b["layers_2"]
        for k in key.split("/"):
            node_a, node_b = node_a[k], node_b[k]
        assert tuple(node_a.spec) == (None, *node_b.spec) or (not tuple(node_b.spec) and
                                                                set(node_a.spec) <= {None})
    ma, mb = decay_mask(stacked), decay_mask(per_layer)
    assert ma["layers"]["attn"]["q"]["A"] and ma["layers"]["mlp"]["down"]["kernel"]
    assert not ma["layers"]["attn_norm"]["scale"] and not ma["embed"]["embedding"]
    assert jax.tree.leaves(ma["layers"]) == jax.tree.leaves(mb["layers_0"])


def test_compress_prune_and_export_take_the_stacked_layout():
    """compress and prune give the same model from either layout (stacked out when the result's layers agree)."""
    from plrd_jax.nn.layout import stack_layers, unstack_layers
    from plrd_jax.transforms.compress import compress
    from plrd_jax.transforms.plan import RankPlan
    from plrd_jax.transforms.prune import prune

    config = BASE.replace(scan_layers=True)
    per_layer = init_params(BASE, 4)
    stacked = stack_layers(per_layer, config)
    plan = RankPlan(("attn", "mlp"), fraction=0.5)
    pa, ca, _ = compress(stacked, plan, config)
    pb, cb, _ = compress(per_layer, plan, BASE)
    assert "layers" in pa and ca.scan_layers and "layers_0" in pb
    for x, y in zip(jax.tree.leaves(unstack_layers(pa)), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    masks = {"z_int": np.concatenate([np.ones((5, 40)), np.zeros((5, 8))], 1).astype(np.float32)}
    qa, da = prune(stacked, config, masks)
    qb, db = prune(per_layer, BASE, masks)
    assert "layers" in qa and da.intermediate_size == db.intermediate_size == 40
    for x, y in zip(jax.tree.leaves(unstack_layers(qa)), jax.tree.leaves(qb)):
        np.testing.assert_array_equal(x, y)


def test_masks_run_on_stacked_params():
    from plrd_jax.nn.layout import stack_layers

    params = init_params(UNIFORM, 5)
    stacked = stack_layers(params, UNIFORM.replace(scan_layers=True))
    rng = np.random.default_rng(2)
    masks = {"z_layer": jnp.asarray(rng.uniform(size=5), jnp.float32),
             "z_head": jnp.asarray(rng.uniform(size=(5, 4)), jnp.float32),
             "z_int": jnp.asarray(rng.uniform(size=(5, 48)), jnp.float32),
             "z_hidden": jnp.asarray(rng.uniform(size=32), jnp.float32)}
    a = Decoder(UNIFORM.replace(scan_layers=True)).apply({"params": stacked}, TOKENS, masks=masks)
    b = Decoder(UNIFORM).apply({"params": params}, TOKENS, masks=masks)
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())
