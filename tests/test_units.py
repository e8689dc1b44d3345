"""prune_units: generic structured pruning from a declarative unit description, checked against hand-sliced
numpy references on a foreign linen MLP, a MaxText-style scanned attention block and our decoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import LinearSpec, ModelConfig
from plrd_jax.nn.model import init_params
from plrd_jax.transforms.factorize import factorize
from plrd_jax.transforms.prune import apply_cut, decoder_keep, prune, prune_cuts
from plrd_jax.transforms.units import PruneError, Slot, Unit, decoder_units, leaf_paths, prune_units


# ---- a foreign linen MLP ------------------------------------------------------------------------
class ForeignMLP(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.width)(x))  # Dense_0 (named in creation order)
        return nn.Dense(16)(h)  # Dense_1


class Tower(nn.Module):
    """A module with its own names around the MLP: params {"ffn": {"Dense_0": ..., "Dense_1": ...}}."""
    width: int = 64

    @nn.compact
    def __call__(self, x):
        return ForeignMLP(self.width, name="ffn")(x)


MLP_UNIT = Unit("hidden", 64, (Slot("*/Dense_0/kernel", 1), Slot("ffn/Dense_0/bias", 0),
                               Slot("ffn/Dense_1/kernel", 0)))


def tower_params(seed=0):
    x = jnp.zeros((1, 12))
    params = Tower().init(jax.random.key(seed), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32), params)


def gelu64(h):
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))


def test_foreign_linen_mlp_prunes_to_hand_slices_and_to_the_zeroed_model():
    params = tower_params()
    keep = np.random.default_rng(1).random(64) < 0.4
    kept = np.flatnonzero(keep)
    small = prune_units(params, [MLP_UNIT], {"hidden": keep})

    f = {k: np.asarray(v) for k, v in params["ffn"]["Dense_0"].items()}
    g = {k: np.asarray(v) for k, v in params["ffn"]["Dense_1"].items()}
    np.testing.assert_array_equal(small["ffn"]["Dense_0"]["kernel"], f["kernel"][:, kept])
    np.testing.assert_array_equal(small["ffn"]["Dense_0"]["bias"], f["bias"][kept])
    np.testing.assert_array_equal(small["ffn"]["Dense_1"]["kernel"], g["kernel"][kept, :])
    assert small["ffn"]["Dense_1"]["bias"] is params["ffn"]["Dense_1"]["bias"]  # untouched

    x = np.random.default_rng(2).normal(size=(5, 12))
    y_small = np.asarray(Tower(len(kept)).apply({"params": small}, jnp.asarray(x, jnp.float32)))
    zeroed = jax.tree.map(lambda a: a, params)
    zeroed["ffn"]["Dense_0"] = {"kernel": params["ffn"]["Dense_0"]["kernel"] * keep,
                                "bias": params["ffn"]["Dense_0"]["bias"] * keep}
    y_zeroed = np.asarray(Tower(64).apply({"params": zeroed}, jnp.asarray(x, jnp.float32)))
    closed = (gelu64(x @ f["kernel"] + f["bias"]) * keep) @ g["kernel"] + g["bias"]  # float64, gelu(0) = 0
    np.testing.assert_allclose(y_small, y_zeroed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_small, closed, rtol=1e-4, atol=1e-4)


# ---- a MaxText-style scanned attention block ----------------------------------------------------
L, D, H, HD = 3, 16, 4, 8
ATTN = "decoder/layers/self_attention"
HEAD_UNIT = Unit("heads", H, (Slot(f"{ATTN}/[qkv]*/kernel", 2, stacked=True),  # query, key, value
                              Slot(f"{ATTN}/out/kernel", 1, stacked=True)))


def maxtext_params(seed=0):
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)
    attn = {"query": {"kernel": w(L, D, H, HD)}, "key": {"kernel": w(L, D, H, HD)},
            "value": {"kernel": w(L, D, H, HD)}, "out": {"kernel": w(L, H, HD, D)}}
    return {"decoder": {"layers": {"self_attention": attn, "pre_self_attention_norm": {"scale": w(L, D)}}}}


def attention64(x, q, k, v, o, keep=None):
    """float64 scanned causal MHA with residual: x ← x + Σ_h keep[l, h] · head h's output, layer by layer."""
    q, k, v, o = (np.asarray(a, np.float64) for a in (q, k, v, o))
    T = x.shape[1]
    causal = np.where(np.tril(np.ones((T, T), bool)), 0.0, -np.inf)
    for l in range(q.shape[0]):
        Q, K, V = (np.einsum("btd,dhk->bthk", x, w[l]) for w in (q, k, v))
        s = np.einsum("bqhk,bshk->bhqs", Q, K) / np.sqrt(q.shape[-1]) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        per_head = np.einsum("bqhk,hkd->bqhd", np.einsum("bhqs,bshk->bqhk", p, V), o[l])
        if keep is not None:
            per_head = per_head * keep[l][None, None, :, None]
        x = x + per_head.sum(axis=2)
    return x


@pytest.mark.parametrize("per_layer", [True, False], ids=["per-layer-mask", "one-mask-for-all-layers"])
def test_maxtext_scanned_heads_prune_to_hand_slices_and_to_the_block_without_them(per_layer):
    params = maxtext_params()
    keep = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], bool)
    if not per_layer:
        keep = keep[0]
    small = prune_units(params, [HEAD_UNIT], {"heads": keep})

    keep_l = np.broadcast_to(keep, (L, H))
    full, cut = params["decoder"]["layers"]["self_attention"], small["decoder"]["layers"]["self_attention"]
    for name in ("query", "key", "value"):
        ref = np.stack([np.asarray(full[name]["kernel"])[l][:, np.flatnonzero(keep_l[l])] for l in range(L)])
        np.testing.assert_array_equal(cut[name]["kernel"], ref)
    ref_out = np.stack([np.asarray(full["out"]["kernel"])[l][np.flatnonzero(keep_l[l])] for l in range(L)])
    np.testing.assert_array_equal(cut["out"]["kernel"], ref_out)
    norm = params["decoder"]["layers"]["pre_self_attention_norm"]["scale"]
    assert small["decoder"]["layers"]["pre_self_attention_norm"]["scale"] is norm

    x = np.random.default_rng(3).normal(size=(2, 6, D))
    pruned = attention64(x, *(cut[n]["kernel"] for n in ("query", "key", "value", "out")))
    removed = attention64(x, *(full[n]["kernel"] for n in ("query", "key", "value", "out")), keep=keep_l)
    np.testing.assert_allclose(pruned, removed, rtol=1e-10, atol=1e-10)
    assert not np.allclose(removed, attention64(x, *(full[n]["kernel"] for n in ("query", "key", "value", "out"))))


# ---- validation ---------------------------------------------------------------------------------
ONES = np.ones(64, bool)
ERRORS = {
    "unknown unit": ([MLP_UNIT], {"channels": ONES}, "'channels'"),
    "mask length": ([MLP_UNIT], {"hidden": np.ones(63, bool)}, r"keep\['hidden'\] has shape \(63,\)"),
    "no leaf": ([Unit("hidden", 64, (Slot("ffn/Dense_9/kernel", 1),))], {"hidden": ONES},
                "'ffn/Dense_9/kernel' of unit 'hidden' matches no leaf"),
    "axis length": ([Unit("hidden", 32, (Slot("ffn/Dense_0/kernel", 1),))], {"hidden": ONES[:32]},
                    "'ffn/Dense_0/kernel' axis 1 has length 64; unit 'hidden' needs"),
    "axis out of range": ([Unit("hidden", 64, (Slot("ffn/Dense_0/bias", 1),))], {}, "'ffn/Dense_0/bias'"),
    "two units one axis": ([MLP_UNIT, Unit("other", 32, (Slot("ffn/Dense_1/kernel", 0, size=2),))], {},
                           "'ffn/Dense_1/kernel' axis 0 is sliced by unit 'hidden'.*and by unit 'other'"),
    "all removed": ([MLP_UNIT], {"hidden": np.zeros(64, bool)}, "removes every unit of 'hidden'"),
    "per-layer mask, unstacked slot": ([MLP_UNIT], {"hidden": np.ones((2, 64), bool)},
                                       r"\(2, 64\) but slot '\*/Dense_0/kernel' of unit 'hidden' is not stacked"),
    "duplicate unit name": ([MLP_UNIT, MLP_UNIT], {}, "'hidden' appears twice"),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_invalid_descriptions_and_masks_give_one_line_errors_naming_the_culprit(case):
    units, keep, match = ERRORS[case]
    with pytest.raises(PruneError, match=match) as err:
        prune_units(tower_params(), units, keep)
    assert "\n" not in str(err.value)


def test_stacked_masks_must_keep_as_many_units_in_every_layer_and_match_the_stack():
    uneven = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], bool)
    with pytest.raises(PruneError, match=r"keep\['heads'\] keeps \[2, 1, 2\] units") as err:
        prune_units(maxtext_params(), [HEAD_UNIT], {"heads": uneven})
    assert "\n" not in str(err.value)
    with pytest.raises(PruneError, match="removes every unit of 'heads' in layer 1"):
        prune_units(maxtext_params(), [HEAD_UNIT], {"heads": uneven * np.array([[1], [0], [1]], bool)})
    with pytest.raises(PruneError, match=r"has 2 layers but stacked leaf '.*/key/kernel' has 3"):
        prune_units(maxtext_params(), [HEAD_UNIT], {"heads": np.ones((2, H), bool)})
    with pytest.raises(PruneError, match="stacked, so axis 0 is its layer axis"):
        prune_units(maxtext_params(), [Unit("layers", L, (Slot(f"{ATTN}/out/kernel", 0, stacked=True),))], {})


def test_leaf_paths_are_what_slots_match():
    assert leaf_paths(tower_params()) == ["ffn/Dense_0/bias", "ffn/Dense_0/kernel", "ffn/Dense_1/bias",
                                          "ffn/Dense_1/kernel"]


# ---- our decoder --------------------------------------------------------------------------------
GQA = ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=32, num_layers=3, num_heads=6, num_kv_heads=3,
                  head_dim=4, max_seq_len=16, tie_embeddings=False, qkv_bias=True)


def blocks(units, size):
    """Entries of the kept units, `size` consecutive ones each."""
    return (np.flatnonzero(units)[:, None] * size + np.arange(size)).reshape(-1)


def hand_sliced_decoder(params, config, hidden, heads, kv, inter):
    """numpy reference, leaf by leaf: rows (kernel or A) and columns (kernel or B) of every matrix."""
    h, hd = np.flatnonzero(hidden), config.head_dim_
    np_ = jax.tree.map(np.asarray, params)

    def matrix(node, rows, cols):
        out = {}
        for leaf, x in node.items():
            x = x[rows] if leaf in ("kernel", "A") and rows is not None else x
            x = x[:, cols] if leaf in ("kernel", "B") and cols is not None else x
            out[leaf] = x[cols] if leaf == "bias" else x
        return out
    ref = {"embed": {"embedding": np_["embed"]["embedding"][:, h]},
           "final_norm": {"scale": np_["final_norm"]["scale"][h]}, "lm_head": matrix(np_["lm_head"], h, None)}
    for i in range(config.num_layers):
        p, q_cols, kv_cols, m = np_[f"layers_{i}"], blocks(heads[i], hd), blocks(kv[i], hd), np.flatnonzero(inter[i])
        ref[f"layers_{i}"] = {
            "attn_norm": {"scale": p["attn_norm"]["scale"][h]}, "mlp_norm": {"scale": p["mlp_norm"]["scale"][h]},
            "attn": {"q": matrix(p["attn"]["q"], h, q_cols), "k": matrix(p["attn"]["k"], h, kv_cols),
                     "v": matrix(p["attn"]["v"], h, kv_cols), "o": matrix(p["attn"]["o"], q_cols, h)},
            "mlp": {"gate": matrix(p["mlp"]["gate"], h, m), "up": matrix(p["mlp"]["up"], h, m),
                    "down": matrix(p["mlp"]["down"], m, h)}}
    return ref


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decoder_units_slice_like_a_hand_written_reference():
    params, config = factorize(init_params(GQA, seed=0), {"layers_1/attn/o": 4, "layers_2/mlp/up": 6}, GQA)
    rng = np.random.default_rng(0)
    hidden, heads = rng.random(24) < 0.7, rng.random((3, 6)) < 0.6
    kv, inter = rng.random((3, 3)) < 0.6, rng.random((3, 32)) < 0.5
    heads[:, 0] = kv[:, 0] = inter[:, 0] = True
    keep = {"hidden": hidden}
    for i in range(3):
        keep |= {f"layers_{i}/heads": heads[i], f"layers_{i}/kv_heads": kv[i], f"layers_{i}/channels": inter[i]}
    small = prune_units(params, decoder_units(config), keep)
    assert_trees_equal(small, hand_sliced_decoder(params, config, hidden, heads, kv, inter))


def todays_prune(params, config, masks):
    """prune as it was before units: every Cut (slice and scale) applied whole, node by node."""
    cuts, new_config = prune_cuts(config, masks)
    out = {}
    for old, cut in cuts.items():
        node = params
        for key in old:
            node = node[key]
        target = out
        for key in cut.path:
            target = target.setdefault(key, {})
        for leaf, x in node.items():
            target[leaf] = apply_cut(leaf, x, cut)
    return out, new_config


def test_decoder_units_with_0_1_masks_equal_prune_and_prune_equals_todays_prune():
    params, config = factorize(init_params(GQA, seed=1), {"layers_0/attn/q": 4, "lm_head": 8}, GQA)
    keys = jax.random.split(jax.random.key(2), 4)
    log_alpha = {n: jax.random.uniform(k, s, jnp.float32, -4.0, 4.0)
                 for k, (n, s) in zip(keys, M.mask_shapes(config).items())}
    target = M.TargetShape(num_layers=3, hidden_size=18, num_heads=4, num_kv_heads=2, intermediate_size=20)
    soft = M.deterministic(log_alpha, config, target.resolve(config))
    zero_one = {n: (z != 0).astype(np.float32) for n, z in soft.items()}
    small, _ = prune(params, config, zero_one)
    assert_trees_equal(prune_units(params, decoder_units(config), decoder_keep(config, zero_one)), small)

    soft["z_layer"] = soft["z_layer"].at[1].set(0.0)  # drop a layer; the kept values are folded in
    assert_trees_equal(prune(params, config, soft)[0], todays_prune(params, config, soft)[0])
    assert prune(params, config, soft)[1] == todays_prune(params, config, soft)[1]


def test_decoder_units_refuse_sltrain_matrices():
    config = GQA.with_linears({"layers_0/mlp/up": LinearSpec("sltrain", rank=4, nnz=20, alpha=8.0)})
    with pytest.raises(PruneError, match="layers_0/mlp/up is an SLTrain matrix"):
        decoder_units(config)
    assert len(decoder_units(GQA, layers=[0, 2])) == 1 + 2 * 3


def test_prune_on_a_foreign_tree_points_to_units():
    from plrd_jax.transforms.prune import prune

    with pytest.raises(PruneError, match="prune_units"):
        prune({"Dense_0": {"kernel": np.zeros((4, 4))}}, None, {})
