import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from plrd_jax import LinearSpec, ModelConfig, init_params
from plrd_jax.nn.sharding import (MESH_AXES, RULES, batch_sharding, logical_axes, make_mesh, param_shardings,
                               partition_spec)

TINY = ModelConfig(vocab_size=100, hidden_size=48, intermediate_size=72, num_layers=1, num_heads=3,
                   num_kv_heads=1, max_seq_len=32, qkv_bias=True)


def test_make_mesh_resolves_minus_one_to_the_remaining_devices():
    n = jax.device_count()
    for shape in [(-1, 1, 1), (1, -1, 1), (1, 1, -1), (1, n, 1)]:
        mesh = make_mesh(shape)
        assert mesh.axis_names == MESH_AXES
        assert mesh.devices.size == n


def test_make_mesh_rejects_a_shape_that_does_not_cover_the_devices():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"has {2 * n} devices but there are {n}"):
        make_mesh((2, n, 1))
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh((-1, -1, 1))
    with pytest.raises(ValueError, match="one size per axis"):
        make_mesh((1, 1))


def test_logical_axes_of_every_parameter_kind():
    config = TINY.with_linears({"layers_0/attn/q": LinearSpec("lowrank", rank=4),
                                "layers_0/mlp/down": LinearSpec("lowrank", rank=4),
                                "layers_0/mlp/up": LinearSpec("sltrain", rank=4, nnz=10, alpha=8.0)})
    params = init_params(config)
    got = {jax.tree_util.keystr(kp, simple=True, separator="/"): logical_axes(
        jax.tree_util.keystr(kp, simple=True, separator="/"), x.shape)
        for kp, x in jax.tree_util.tree_leaves_with_path(params)}
    assert got == {
        "embed/embedding": ("vocab", "embed"),
        "layers_0/attn_norm/scale": ("norm",),
        "layers_0/mlp_norm/scale": ("norm",),
        "final_norm/scale": ("norm",),
        "layers_0/attn/q/A": ("embed", "rank"),
        "layers_0/attn/q/B": ("rank", "heads"),
        "layers_0/attn/q/bias": ("heads",),
        "layers_0/attn/k/kernel": ("embed", "kv_heads"),
        "layers_0/attn/k/bias": ("kv_heads",),
        "layers_0/attn/v/kernel": ("embed", "kv_heads"),
        "layers_0/attn/v/bias": ("kv_heads",),
        "layers_0/attn/o/kernel": ("heads", "embed"),
        "layers_0/mlp/gate/kernel": ("embed", "mlp"),
        "layers_0/mlp/up/A": ("embed", "rank"),
        "layers_0/mlp/up/B": ("rank", "mlp"),
        "layers_0/mlp/up/values": ("sparse",),
        "layers_0/mlp/up/indices": ("sparse",),
        "layers_0/mlp/down/A": ("mlp", "rank"),
        "layers_0/mlp/down/B": ("rank", "embed"),
        "lm_head/kernel": ("embed", "vocab"),
    }
    assert logical_axes("something/else", (3, 4)) == (None, None)


MESH_2_4_8 = {"data": 2, "fsdp": 4, "tensor": 8}


@pytest.mark.parametrize("axes, shape, spec", [
    (("embed", "heads"), (576, 576), P("fsdp", "tensor")),  # SmolLM2 q: 9 heads × 64
    (("embed", "kv_heads"), (576, 192), P("fsdp", "tensor")),  # 3 kv heads × 64
    (("vocab", "embed"), (49152, 576), P("tensor", "fsdp")),
    (("vocab", "embed"), (49153, 576), P(None, "fsdp")),  # odd vocab: tensor dropped
    (("embed", "mlp"), (102, 1536), P(None, "tensor")),  # 102 % 4 != 0: fsdp dropped
    (("embed", "rank"), (576, 7), P("fsdp", None)),  # rank is never split
    (("norm",), (576,), P(None)),
    (("sparse",), (1001,), P(None)),
    (("batch", None), (16, 512), P(("data", "fsdp"), None)),
    (("batch", None), (6, 512), P("data", None)),  # 6 % 8 != 0: keep the axes that divide
    ((None, None), (8, 8), P(None, None)),
])
def test_partition_spec_drops_mesh_axes_that_do_not_divide(axes, shape, spec):
    assert partition_spec(axes, shape, MESH_2_4_8) == spec


def test_partition_spec_uses_a_mesh_axis_at_most_once():
    rules = dict(RULES, embed="tensor")
    assert partition_spec(("embed", "mlp"), (64, 64), MESH_2_4_8, rules) == P("tensor", None)


def test_param_shardings_mirror_params_on_a_mesh():
    params = init_params(TINY)
    mesh = make_mesh((1, -1, 1))
    shardings = param_shardings(params, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(shardings))
    n = jax.device_count()
    gate = shardings["layers_0"]["mlp"]["gate"]["kernel"].spec
    assert gate == partition_spec(("embed", "mlp"), (48, 72), {"data": 1, "fsdp": n, "tensor": 1})
    placed = jax.device_put(params, shardings)  # every spec is valid for its shape
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, placed, params))


def test_batch_sharding_splits_the_batch_dimension_over_data_and_fsdp():
    mesh = make_mesh((1, -1, 1))
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert batch_sharding(mesh, leading_dims=1).spec == P(None, ("data", "fsdp"))
