"""Minitron: activation importance against a numpy float64 forward, top-k masks, and the pruned model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.methods.minitron import dense_count, importance, minitron_masks, minitron_prune, target_for_budget
from plrd_jax.nn.model import Decoder, init_params
from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.prune import pruned_shape

GQA = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_seq_len=16, tie_embeddings=True, qkv_bias=True)
MHA = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=4,
                  head_dim=8, max_seq_len=16, tie_embeddings=False)
WINDOWS = np.random.default_rng(0).integers(0, 64, (5, 12)).astype(np.int32)


def perturbed(params, seed=1):
    """Norm scales and biases away from their init (ones / zeros)."""
    rng = np.random.default_rng(seed)

    def bump(path, x):
        return x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) if path[-1].key in ("scale", "bias") else x
    return jax.tree_util.tree_map_with_path(bump, params)


# ---- a numpy float64 forward that returns the activations importance reads ---------------------
def np_activations(config, params, tokens):
    """Per layer: attention output per head (B, T, H, hd), MLP activation (B, T, m), the two norms' outputs
    (B, T, d) and the block's input and output (B, T, d), from the params in float64."""
    c = config
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim_
    B, T = tokens.shape

    def norm(x, scale):
        return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps)

    def lin(x, node):
        return x @ node["kernel"] + node.get("bias", 0.0)

    inv_freq = 1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv_freq  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]  # (T, 1, hd/2)

    def rope(x):  # HF rotate-half: (x1, x2) -> (x1 cos − x2 sin, x2 cos + x1 sin)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = p["embed"]["embedding"][tokens]
    out = []
    for i in range(c.num_layers):
        lp = p[f"layers_{i}"]
        x_in = x
        a = norm(x, lp["attn_norm"]["scale"])
        q = rope(lin(a, lp["attn"]["q"]).reshape(B, T, H, hd))
        k = rope(lin(a, lp["attn"]["k"]).reshape(B, T, KV, hd))
        v = lin(a, lp["attn"]["v"]).reshape(B, T, KV, hd)
        k, v = np.repeat(k, H // KV, axis=2), np.repeat(v, H // KV, axis=2)  # query head h uses kv h // (H/KV)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        heads = np.einsum("bhts,bshd->bthd", prob, v)
        x = x + heads.reshape(B, T, H * hd) @ lp["attn"]["o"]["kernel"]
        g = norm(x, lp["mlp_norm"]["scale"])
        gate = lin(g, lp["mlp"]["gate"])
        act = gate / (1 + np.exp(-gate)) * lin(g, lp["mlp"]["up"])
        x = x + act @ lp["mlp"]["down"]["kernel"]
        out.append({"heads": heads, "act": act, "norms": (a, g), "block": (x_in, x)})
    return out


def np_importance(config, params, windows):
    acts = np_activations(config, params, np.asarray(windows))
    seq = lambda y, axes=(1,): np.sqrt(np.sum(y * y, axis=axes)).mean(0)  # L2 over the sequence, batch mean
    cos = lambda a, b: np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return {"heads": np.stack([seq(a["heads"], (1, 3)) for a in acts]),
            "int": np.stack([seq(a["act"]) for a in acts]),
            "hidden": sum(seq(n) for a in acts for n in a["norms"]),
            "layers": np.array([1 - cos(*a["block"]).mean() for a in acts])}


@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa-tied-bias", "mha-untied"])
def test_importance_equals_a_numpy_float64_recomputation(config):
    params = perturbed(init_params(config, seed=0))
    got = importance(config, params, WINDOWS, batch_size=2)  # 5 windows: the last batch is padded
    want = np_importance(config, params, WINDOWS)
    assert set(got) == {"heads", "int", "hidden", "layers"}
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-7, err_msg=name)
    # the units do differ in importance, so that the comparison above ranks something
    assert np.ptp(want["heads"][0]) > 1e-3 * want["heads"][0].max() and np.ptp(want["int"][0]) > 0


def test_importance_is_independent_of_the_batch_size():
    params = init_params(GQA, seed=3)
    a, b = importance(GQA, params, WINDOWS, batch_size=1), importance(GQA, params, WINDOWS, batch_size=4)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, err_msg=name)


def test_a_silenced_channel_or_kv_group_has_zero_importance_and_the_rest_are_unchanged():
    """Cuts in the last layer, so that nothing the cut unit feeds is read back."""
    params = perturbed(init_params(GQA, seed=0))
    base = importance(GQA, params, WINDOWS)
    last, hd = f"layers_{GQA.num_layers - 1}", GQA.head_dim_

    cut = jax.tree.map(lambda x: x, params)
    cut[last]["mlp"]["up"]["kernel"] = params[last]["mlp"]["up"]["kernel"].at[:, 7].set(0.0)  # silu(g_7)·0
    got = importance(GQA, cut, WINDOWS)
    assert got["int"][-1, 7] == 0.0 and base["int"][-1, 7] > 0
    np.testing.assert_allclose(np.delete(got["int"][-1], 7), np.delete(base["int"][-1], 7), rtol=1e-5)
    np.testing.assert_allclose(got["heads"], base["heads"], rtol=1e-5)

    cut = jax.tree.map(lambda x: x, params)
    v = params[last]["attn"]["v"]
    cut[last]["attn"]["v"] = {"kernel": v["kernel"].at[:, hd:].set(0.0), "bias": v["bias"].at[hd:].set(0.0)}
    got = importance(GQA, cut, WINDOWS)
    # kv group 1 holds query heads 2 and 3 (H/KV = 2): their outputs are zero, heads 0 and 1 unchanged
    assert np.all(got["heads"][-1, 2:] == 0.0) and np.all(base["heads"][-1, 2:] > 0)
    np.testing.assert_allclose(got["heads"][-1, :2], base["heads"][-1, :2], rtol=1e-5)
    np.testing.assert_allclose(got["heads"][:-1], base["heads"][:-1], rtol=1e-5)


# ---- masks --------------------------------------------------------------------------------------
def random_importance(config, seed=0):
    rng = np.random.default_rng(seed)
    L, H, m, d = config.num_layers, config.num_heads, config.intermediate_size, config.hidden_size
    return {"heads": rng.random((L, H)), "int": rng.random((L, m)), "hidden": rng.random(d),
            "layers": rng.random(L)}


@pytest.mark.parametrize("config, target", [
    (GQA, M.TargetShape(num_layers=1, hidden_size=20, num_heads=2, intermediate_size=30)),  # 1 head per group
    (GQA, M.TargetShape(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48)),
    (MHA, M.TargetShape(num_layers=2, hidden_size=24, num_heads=3, intermediate_size=17)),
], ids=["gqa-heads-within-groups", "gqa-drop-a-group", "mha"])
def test_masks_keep_exactly_the_target_counts_of_the_most_important_units(config, target):
    imp = random_importance(config)
    z = minitron_masks(config, imp, target)
    resolved = target.resolve(config)
    assert pruned_shape(z, config) == resolved.to_dict()
    assert all(set(np.unique(x)) <= {0.0, 1.0} for x in z.values())

    def top(scores, k):
        return set(np.argsort(-scores)[:k].tolist())

    assert set(np.flatnonzero(z["z_layer"])) == top(imp["layers"], target.num_layers)
    assert set(np.flatnonzero(z["z_hidden"])) == top(imp["hidden"], target.hidden_size)
    G, g = config.num_heads // config.num_kv_heads, resolved.num_heads // resolved.num_kv_heads
    for i in range(config.num_layers):
        assert set(np.flatnonzero(z["z_int"][i])) == top(imp["int"][i], target.intermediate_size)
        kept = np.flatnonzero(z["z_head"][i])
        assert len(kept) == resolved.num_heads
        # per kept group its g best heads; the kept groups are the best by their picked heads' sum
        groups = imp["heads"][i].reshape(config.num_kv_heads, G)
        picked = {k: sorted(top(groups[k], g)) for k in range(config.num_kv_heads)}
        sums = np.array([groups[k][picked[k]].sum() for k in range(config.num_kv_heads)])
        want = sorted(k * G + h for k in top(sums, resolved.num_kv_heads) for h in picked[k])
        assert kept.tolist() == want


def test_invalid_target_shape_is_refused():
    with pytest.raises(M.ShapeError, match="query heads per kv group"):
        minitron_masks(GQA, random_importance(GQA), M.TargetShape(2, 32, 4, 48, num_kv_heads=1))


# ---- targets and the pruned model ---------------------------------------------------------------
def test_dense_count_is_the_models_parameter_count():
    for config in (GQA, MHA, GQA.replace(hidden_size=20, num_heads=2, intermediate_size=7, num_layers=1)):
        assert dense_count(config) == count_params(init_params(config))


@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa", "mha"])
def test_width_targets_meet_budgets_and_follow_the_rule(config):
    full = dense_count(config)
    shapes = []
    for fraction in (0.95, 0.8, 0.65, 0.5, 0.4):
        budget = int(fraction * full)
        target = target_for_budget(config, budget).resolve(config)
        assert abs(dense_count(target.config(config)) - budget) <= 0.01 * budget
        assert target.num_layers == config.num_layers and target.num_kv_heads == (
            config.num_kv_heads if config.num_kv_heads < config.num_heads else target.num_heads)
        assert target.hidden_size % target.num_heads == 0
        shapes.append(target)
    # the MLP loses a larger fraction than the hidden size
    assert all(t.intermediate_size / config.intermediate_size <= t.hidden_size / config.hidden_size for t in shapes)
    assert shapes[-1].hidden_size < config.hidden_size


def test_width_rule_on_the_smollm2_135m_shape():
    """Shapes only (no weights): hidden fraction ≈ sqrt(intermediate fraction), heads never grow back."""
    config = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, tie_embeddings=True)
    full = dense_count(config)
    assert full == 134_515_008  # SmolLM2-135M
    heads = []
    for percent in range(95, 25, -5):
        budget = full * percent // 100
        t = target_for_budget(config, budget).resolve(config)
        assert abs(dense_count(t.config(config)) - budget) <= 0.01 * budget
        f_m, f_d = t.intermediate_size / 1536, t.hidden_size / 576
        assert abs(np.log(f_d) - 0.5 * np.log(f_m)) < 0.1, (percent, t)
        assert t.num_kv_heads == 3 and t.num_layers == 30
        heads.append(t.num_heads)
    assert heads == sorted(heads, reverse=True) and heads[0] == 9 and heads[-1] == 6


def test_depth_targets_drop_layers_only():
    full, fixed = dense_count(MHA), dense_count(MHA.replace(num_layers=0))
    per_layer = (full - fixed) // MHA.num_layers
    target = target_for_budget(MHA, fixed + 2 * per_layer, "depth")
    assert target == M.TargetShape(2, MHA.hidden_size, MHA.num_heads, MHA.intermediate_size, MHA.num_kv_heads)


@pytest.mark.parametrize("config, mode, fraction", [(GQA, "width", 0.6), (MHA, "width", 0.7), (MHA, "depth", None)],
                         ids=["gqa-width", "mha-width", "mha-depth"])
def test_pruned_model_equals_the_masked_parent_and_meets_the_budget(config, mode, fraction):
    params = perturbed(init_params(config, seed=0))
    if fraction is None:  # depth: a budget of exactly two layers' model
        budget = dense_count(config.replace(num_layers=2))
    else:
        budget = int(fraction * dense_count(config))
    small_params, small_config, report = minitron_prune(config, params, WINDOWS, budget, mode)

    target = target_for_budget(config, budget, mode)
    imp = importance(config, params, WINDOWS)
    masks = minitron_masks(config, imp, target)
    assert report["target"] == target.resolve(config).to_dict()
    assert report["params"] == count_params(small_params) == dense_count(small_config)
    assert abs(report["params"] - budget) <= 0.01 * budget
    assert report["dropped_layers"] == np.flatnonzero(masks["z_layer"] == 0).tolist()
    if mode == "depth":
        assert report["dropped_layers"] == [int(np.argmin(imp["layers"]))]
    else:
        assert report["dropped_layers"] == []
    tokens = jnp.asarray(WINDOWS[:2])
    want = Decoder(config).apply({"params": params}, tokens, masks={k: jnp.asarray(v) for k, v in masks.items()})
    got = Decoder(small_config).apply({"params": small_params}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_bad_budgets_and_modes_give_one_line_errors():
    full = dense_count(GQA)
    cases = [(GQA, full * 2, "width", "not in"), (GQA, 0, "width", "not in"), (GQA, -5, "depth", "not in"),
             (GQA, 100, "width", "out of width pruning's reach"),
             (GQA, dense_count(GQA.replace(num_layers=0)), "depth", "below one layer"),
             (GQA, full // 2, "breadth", "unknown mode"),
             (GQA.with_linears({"layers_0/attn/q": LinearSpec("lowrank", rank=4)}), full // 2, "width", "dense")]
    for config, budget, mode, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            target_for_budget(config, budget, mode)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not in"):
        minitron_prune(GQA, init_params(GQA), WINDOWS, full * 2)
