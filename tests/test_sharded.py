"""Factors keep the kernel's sharding and a sharded kernel is never gathered whole (transforms/sharded.py:
the HLO may gather a slice of it or the small d_out × d_out Gram, never a full kernel).
Multi-device checks run in a subprocess with 4 host CPU devices; the reference is numpy float64's SVD."""
import json
import subprocess
import sys

import numpy as np

from plrd_jax.transforms.sharded import factor_spec, gram_factors, gram_reduce
from plrd_jax.transforms.views import Matrix, MatrixView

SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from plrd_jax.transforms.factorize import factorize, reduce_rank
from plrd_jax.transforms.sharded import factorized_shardings

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
rng = np.random.default_rng(0)
k = rng.standard_normal((64, 48)).astype(np.float32) * np.linspace(3, 0.1, 48, dtype=np.float32)
params = {"m": {"kernel": k}, "stack": {"layers": {"w": {"kernel": rng.standard_normal((4, 16, 12), np.float32)}}}}
shardings = {"m": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
             "stack": {"layers": {"w": {"kernel": NamedSharding(mesh, P(("fsdp", "tensor"), None, None))}}}}
placed = jax.device_put(params, shardings)
ranks = {"m": 8, "stack/layers/w": 3}
out_sh = factorized_shardings(params, shardings, ranks)
FULL = ("f32[64,48]", "f32[4,16,12]", "f32[48,64]")  # a whole kernel (or its transpose) on one device


def full_gathers(hlo):
    return sum(1 for line in hlo.splitlines() if "all-gather(" in line and any(s in line.split("all-gather(")[0]
                                                                               for s in FULL))


out = {}
for gram in (True, False):
    f = jax.jit(lambda p: factorize(p, ranks, gram=gram)[0], out_shardings=out_sh)
    hlo = f.lower(placed).compile().as_text()
    low = f(placed)
    out[f"gram={gram}"] = {"all_gathers": full_gathers(hlo),
                           "A_spec": [str(x) for x in low["m"]["A"].sharding.spec],
                           "B_spec": [str(x) for x in low["m"]["B"].sharding.spec],
                           "AB": np.asarray(low["m"]["A"] @ low["m"]["B"]).tolist()}
eager, _ = factorize(placed, ranks)
out["eager"] = {"A_spec": [str(x) for x in eager["m"]["A"].sharding.spec],
                "B_spec": [str(x) for x in eager["m"]["B"].sharding.spec],
                "stack_A_spec": [str(x) for x in eager["stack"]["layers"]["w"]["A"].sharding.spec]}
red = jax.jit(lambda p: reduce_rank(p, {"m": 4}, gram=True)[0])
lowered = red.lower(jax.device_put(eager, factorized_shardings(params, shardings, ranks)))
out["reduce_all_gathers"] = full_gathers(lowered.compile().as_text())
print(json.dumps(out))
"""


def truncated(k, r):
    u, s, vt = np.linalg.svd(np.asarray(k, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_sharded_factorize_keeps_each_side_and_gram_never_gathers_the_kernel():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    k = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32) * np.linspace(3, 0.1, 48,
                                                                                            dtype=np.float32)
    assert out["gram=True"]["all_gathers"] == 0 and out["reduce_all_gathers"] == 0
    assert out["gram=False"]["all_gathers"] > 0  # the exact SVD gathers the whole matrix on each device
    for key in ("gram=True", "gram=False", "eager"):
        assert out[key]["A_spec"] == ["fsdp", "None"] and out[key]["B_spec"] == ["None", "tensor"], key
    assert out["eager"]["stack_A_spec"] == ["('fsdp', 'tensor')", "None", "None"]
    ref = truncated(k, 8)
    for key in ("gram=True", "gram=False"):
        assert np.abs(np.array(out[key]["AB"]) - ref).max() <= 1e-4 * np.abs(ref).max(), key


def test_factor_specs_follow_the_view_and_logical_names():
    m2 = Matrix(576, 1536, None)
    assert factor_spec(("embed", "mlp"), m2, 2, "rank") == (("embed", "rank"), ("rank", "mlp"))
    out = Matrix(8 * 64, 576, None, 30, MatrixView(stack=1, n_in=2))
    assert factor_spec(("layers", "heads", None, "embed"), out, 4) == (("layers", "heads", None, None),
                                                                        ("layers", None, "embed"))
    weight = Matrix(20, 30, None, 1, MatrixView(transposed=True))
    assert factor_spec(("out", "in"), weight, 2) == (("in", None), (None, "out"))


def test_gram_factors_and_reduce_match_the_truncated_svd():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((40, 30)).astype(np.float32) * np.geomspace(10, 0.5, 30, dtype=np.float32)
    a, b = gram_factors(k, 6)
    ref = truncated(k, 6)
    assert np.abs(np.asarray(a @ b, np.float64) - ref).max() <= 1e-4 * np.abs(ref).max()
    a2, b2 = gram_reduce(a, b, 3)
    ref3 = truncated(np.asarray(a @ b, np.float64), 3)
    assert np.abs(np.asarray(a2 @ b2, np.float64) - ref3).max() <= 1e-4 * np.abs(ref3).max()


def test_logical_names_from_a_linen_tree_carry_over_to_the_factors():
    import flax.linen as nn
    import jax

    from plrd_jax.transforms.factorize import factorize
    from plrd_jax.transforms.sharded import factorized_shardings

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(32, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                      ("embed", "mlp")), name="up")(x)
            return nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                        ("mlp", "embed")), name="down")(h)

    boxed = MLP().init(jax.random.key(0), np.ones((1, 8), np.float32))["params"]
    specs = nn.get_partition_spec(boxed)
    params = nn.meta.unbox(boxed)
    ranks = {"up": 4, "down": 4}
    low_specs = factorized_shardings(params, specs, ranks, rank_axis="rank")
    assert tuple(low_specs["up"]["A"]) == ("embed", "rank") and tuple(low_specs["up"]["B"]) == ("rank", "mlp")
    assert tuple(low_specs["down"]["A"]) == ("mlp", "rank") and tuple(low_specs["down"]["B"]) == ("rank", "embed")
    low, _ = factorize(params, ranks)
    assert jax.tree.structure(low) == jax.tree.structure(low_specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
