"""prune(): the pruned dense model computes what the masked parent computes, and has exactly the target shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder, init_params
from plrd_jax.transforms.factorize import factorize
from plrd_jax.transforms.prune import PruneError, prune, pruned_shape

MHA = ModelConfig(vocab_size=80, hidden_size=48, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                  head_dim=16, max_seq_len=32, tie_embeddings=False)
GQA = ModelConfig(vocab_size=80, hidden_size=48, intermediate_size=64, num_layers=4, num_heads=6, num_kv_heads=3,
                  head_dim=8, max_seq_len=32, tie_embeddings=True, qkv_bias=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 80, (2, 12)), jnp.int32)


def random_log_alpha(config, seed=1):
    """log α spread over [−4, 4] so that the soft scores (and hence the folded values) differ per unit."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return {name: jax.random.uniform(k, shape, jnp.float32, -4.0, 4.0)
            for k, (name, shape) in zip(keys, M.mask_shapes(config).items())}


def perturbed(params, seed=2):
    """Norm scales and biases away from their init (ones / zeros) so that folding into them is tested."""
    rng = np.random.default_rng(seed)

    def bump(path, x):
        key = path[-1].key
        return x + jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) if key in ("scale", "bias") else x
    return jax.tree_util.tree_map_with_path(bump, params)


def logits(config, params, masks=None):
    return np.asarray(Decoder(config).apply({"params": params}, TOKENS, masks=masks))


@pytest.mark.parametrize("config, target", [
    (MHA, M.TargetShape(num_layers=3, hidden_size=40, num_heads=3, intermediate_size=40)),
    (GQA, M.TargetShape(num_layers=2, hidden_size=36, num_heads=4, num_kv_heads=2, intermediate_size=48)),
    (GQA, M.TargetShape(num_layers=3, hidden_size=48, num_heads=3, num_kv_heads=3, intermediate_size=64)),
], ids=["mha-untied", "gqa-tied-bias-drop-groups", "gqa-one-head-per-group"])
def test_pruned_model_matches_masked_model_and_has_the_target_shape(config, target):
    params = perturbed(init_params(config, seed=0))
    target = target.resolve(config)
    masks = M.deterministic(random_log_alpha(config), config, target)
    small_params, small_config = prune(params, config, masks)

    assert small_config == target.config(config).replace(tie_embeddings=config.tie_embeddings)
    expected_shapes = jax.tree.map(lambda x: x.shape, init_params(small_config))
    assert jax.tree.map(lambda x: x.shape, small_params) == expected_shapes
    np.testing.assert_allclose(logits(small_config, small_params), logits(config, params, masks),
                               rtol=2e-5, atol=2e-5)


def test_all_ones_masks_give_the_parents_logits():
    for config in (MHA, GQA):
        params = perturbed(init_params(config, seed=0))
        ones = {name: jnp.ones(shape) for name, shape in M.mask_shapes(config).items()}
        np.testing.assert_allclose(logits(config, params, ones), logits(config, params), rtol=1e-6, atol=1e-6)


def test_expected_size_of_0_1_scores_is_the_pruned_models_matrix_count():
    for config, target in ((MHA, M.TargetShape(2, 40, 3, 40)), (GQA, M.TargetShape(3, 36, 4, 48, 2))):
        target = target.resolve(config)
        masks = M.deterministic(random_log_alpha(config, seed=5), config, target)
        small_params, small_config = prune(init_params(config), config, masks)
        matrices = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(small_params)
                       if path[-1].key == "kernel" and path[0].key.startswith("layers_"))
        zero_one = {name: (z != 0).astype(jnp.float32) for name, z in masks.items()}
        assert float(M.expected_size(zero_one, config)) == matrices == M.matrix_size(small_config)


def test_factorized_matrices_are_pruned_through_their_factors():
    params = perturbed(init_params(MHA, seed=3))
    params, config = factorize(params, {"layers_0/attn/q": 8, "layers_1/mlp/down": 12, "lm_head": 16}, MHA)
    target = M.TargetShape(3, 40, 2, 48).resolve(MHA)
    masks = M.deterministic(random_log_alpha(MHA, seed=4), MHA, target)
    masks["z_layer"] = masks["z_layer"].at[:2].set(1.0).at[2].set(0.0).at[3].set(0.7)  # keep layers 0, 1, 3
    small_params, small_config = prune(params, config, masks)
    assert small_config.linear("layers_0/attn/q").rank == 8 and small_config.linear("layers_1/mlp/down").rank == 12
    assert small_params["layers_0"]["attn"]["q"]["A"].shape == (40, 8)
    np.testing.assert_allclose(logits(small_config, small_params), logits(config, params, masks),
                               rtol=2e-5, atol=2e-5)


def test_masks_that_break_the_model_shape_are_refused():
    ones = {name: np.ones(shape, np.float32) for name, shape in M.mask_shapes(GQA).items()}
    uneven = dict(ones, z_head=ones["z_head"].copy())
    uneven["z_head"][0, [0, 1]] = 0  # layer 0 drops a whole group: 4 heads, the others 6
    with pytest.raises(PruneError, match="kept heads differ between kept layers"):
        pruned_shape(uneven, GQA)
    lopsided = dict(ones, z_head=ones["z_head"].copy())
    lopsided["z_head"][:, [0, 2]] = 0  # groups keep 1, 1, 2 query heads
    with pytest.raises(PruneError, match="same number in every kept group"):
        pruned_shape(lopsided, GQA)
    with pytest.raises(PruneError, match=r"shape \(3,\)"):
        pruned_shape(dict(ones, z_layer=np.ones(3)), GQA)
    with pytest.raises(PruneError, match="keep no layer"):
        pruned_shape(dict(ones, z_layer=np.zeros(4)), GQA)


def test_sltrain_matrices_are_refused_and_numpy_params_stay_numpy():
    """The slicing goes through transforms.units (decoder_units): SLTrain is still refused by name, and a numpy
    (host) tree is pruned to numpy arrays as before."""
    from plrd_jax.nn.config import LinearSpec
    config = MHA.with_linears({"layers_1/mlp/up": LinearSpec("sltrain", rank=4, nnz=32, alpha=8.0)})
    ones = {name: np.ones(shape, np.float32) for name, shape in M.mask_shapes(MHA).items()}
    with pytest.raises(PruneError, match="layers_1/mlp/up is an SLTrain matrix"):
        prune(init_params(config, seed=0), config, ones)
    params = jax.tree.map(np.asarray, perturbed(init_params(MHA, seed=0)))
    masks = M.deterministic(random_log_alpha(MHA), MHA, M.TargetShape(3, 40, 3, 40).resolve(MHA))
    small_params, small_config = prune(params, MHA, masks)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(small_params))
    np.testing.assert_allclose(logits(small_config, small_params), logits(MHA, params, masks), rtol=2e-5, atol=2e-5)
