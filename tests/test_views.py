"""Matrix views (plrd_jax/transforms/views.py): stacked and N-D kernels factorized per slice, counted right, and
nodes that are not matrices left alone with a reason. References: numpy float64 SVD (Eckart–Young)."""
import jax
import numpy as np
import pytest

from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.factorize import densify, factorize, reduce_factors, reduce_rank, svd_factors
from plrd_jax.transforms.plan import PlanError, RankPlan, predict_param_count, resolve_plan, resolve_ranks
from plrd_jax.transforms.views import MatrixView, scan_tree

L, D, H, HD, F = 3, 24, 4, 6, 40
rng = np.random.default_rng(0)


def w(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def tree():
    """A MaxText-style scanned stack (leading layer axis under "layers"), DenseGeneral attention kernels,
    a plain 2-D head."""
    return {"decoder": {"layers": {"mlp": {"wi": {"kernel": w(L, D, F)}, "wo": {"kernel": w(L, F, D)}},
                                   "attention": {"query": {"kernel": w(L, D, H, HD)},
                                                 "out": {"kernel": w(L, H, HD, D)}}}},
            "head": {"kernel": w(D, 50), "bias": w(50)}}


def tail_energy(k, r):
    s = np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)
    return float(np.sum(s[r:] ** 2))


def test_default_views_read_stacks_and_dense_general_kernels():
    found, skipped = scan_tree(tree())
    assert not skipped
    assert found["decoder/layers/mlp/wi"][:4] == (D, F, None, L)
    assert found["decoder/layers/attention/query"][:4] == (D, H * HD, None, L)
    assert found["decoder/layers/attention/out"][:4] == (H * HD, D, None, L)
    assert found["head"][:4] == (D, 50, None, 1)


def test_each_slice_is_its_own_truncated_svd_and_reaches_eckart_young():
    params, r = tree(), 5
    low, _ = factorize(params, RankPlan(("*",), rank=r))
    q = low["decoder"]["layers"]["attention"]["query"]
    o = low["decoder"]["layers"]["attention"]["out"]
    assert q["A"].shape == (L, D, r) and q["B"].shape == (L, r, H, HD)
    assert o["A"].shape == (L, H, HD, r) and o["B"].shape == (L, r, D)
    for l in range(L):
        k = params["decoder"]["layers"]["attention"]["out"]["kernel"][l].reshape(H * HD, D)
        a, b = svd_factors(k, r)
        np.testing.assert_allclose(o["A"][l].reshape(H * HD, r), a, rtol=1e-5, atol=1e-5)
        err = np.sum((k.astype(np.float64) - np.asarray(o["A"][l].reshape(H * HD, r) @ o["B"][l], np.float64)) ** 2)
        assert abs(err - tail_energy(k, r)) <= 1e-4 * np.sum(k.astype(np.float64) ** 2)
    assert low["head"]["bias"] is params["head"]["bias"]


def test_budget_counts_every_slice_and_full_rank_densifies_back():
    params = tree()
    plan = RankPlan(("*",), budget=int(0.7 * count_params(params)))
    ranks = resolve_ranks(params, plan)
    low, _ = factorize(params, plan)
    assert count_params(low) == predict_param_count(params, ranks)
    assert abs(count_params(low) - plan.budget) <= 0.01 * plan.budget
    full, _ = factorize(params, {"decoder/layers/attention/query": D, "decoder/layers/mlp/wo": D})
    dense, _ = densify(full)
    for path in (("attention", "query"), ("mlp", "wo")):
        got = dense["decoder"]["layers"][path[0]][path[1]]["kernel"]
        want = params["decoder"]["layers"][path[0]][path[1]]["kernel"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_energy_rank_of_a_stack_is_its_hungriest_slice_and_reduce_is_per_slice():
    params = tree()
    kernel = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    kernel[1] *= np.linspace(1.0, 0.01, F)[None, :]  # a slice whose energy sits in fewer directions
    (row,) = resolve_plan(params, RankPlan("decoder/layers/mlp/wi", energy=0.9))
    per_slice = []
    for l in range(L):
        s2 = np.linalg.svd(kernel[l].astype(np.float64), compute_uv=False) ** 2
        per_slice.append(int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.9 - 1e-12) + 1))
    assert row.target == max(per_slice) and min(per_slice) < max(per_slice)
    low, _ = factorize(params, {"decoder/layers/mlp/wi": 12})
    lower, _ = reduce_rank(low, {"decoder/layers/mlp/wi": 4})
    node, new = low["decoder"]["layers"]["mlp"]["wi"], lower["decoder"]["layers"]["mlp"]["wi"]
    for l in range(L):
        a, b = reduce_factors(node["A"][l], node["B"][l], 4)
        np.testing.assert_allclose(np.asarray(new["A"][l]) @ np.asarray(new["B"][l]), np.asarray(a @ b),
                                   rtol=1e-4, atol=1e-4)


def test_stacked_factorize_runs_under_jit():
    params = tree()
    low = jax.jit(lambda p: factorize(p, RankPlan(("*",), rank=4))[0])(params)
    assert low["decoder"]["layers"]["mlp"]["wi"]["A"].shape == (L, D, 4)


def test_unknown_n_d_kernels_need_a_view_and_say_so():
    params = {"conv": {"kernel": w(3, 3, 16, 8)}, "head": {"kernel": w(16, 8)}}
    found, skipped = scan_tree(params)
    assert list(found) == ["head"] and "MatrixView" in skipped["conv"]
    with pytest.raises(PlanError, match=r"pattern 'conv' matches no matrix; it matches conv \(an N-D kernel"):
        resolve_plan(params, RankPlan("conv", rank=2))
    view = {"conv": MatrixView(stack=0, n_in=3)}  # (3·3·16) × 8, as a patch-to-channel matrix
    low, _ = factorize(params, RankPlan("conv", rank=2, views=view))
    assert low["conv"]["A"].shape == (3, 3, 16, 2) and low["conv"]["B"].shape == (2, 8)
    assert densify(low)[0]["conv"]["kernel"].shape == (3, 3, 16, 8)


def test_lora_and_s4_nodes_are_never_rewritten():
    lora = {"kernel": w(16, 16), "A": w(16, 2), "B": w(2, 16)}
    s4 = {"A": w(8, 8), "B": w(8, 1), "C": w(1, 8)}
    params = {"lora": lora, "s4": s4, "dense": {"kernel": w(16, 16)}}
    found, skipped = scan_tree(params)
    assert list(found) == ["dense"] and "LoRA" in skipped["lora"] and "C beside its weights" in skipped["s4"]
    with pytest.raises(PlanError, match="LoRA"):
        factorize(params, {"lora": 4})
    with pytest.raises(PlanError, match="pattern 'lora' matches no matrix"):
        resolve_plan(params, RankPlan("lora", rank=4))
    dense, _ = densify(params)
    assert set(dense["s4"]) == {"A", "B", "C"} and set(dense["lora"]) == {"kernel", "A", "B"}
    assert jax.tree.all(jax.tree.map(np.array_equal, (dense["s4"], dense["lora"]), (s4, lora)))


def test_weight_leaves_are_read_transposed():
    weight = w(30, 20)  # PyTorch / levanter: (d_out, d_in), y = x Wᵀ
    x = w(5, 20)
    low, _ = factorize({"proj": {"weight": weight}}, {"proj": 20})
    a, b = low["proj"]["A"], low["proj"]["B"]
    assert a.shape == (20, 20) and b.shape == (20, 30)
    np.testing.assert_allclose(x @ np.asarray(a) @ np.asarray(b), x @ weight.T, rtol=1e-4, atol=1e-4)
    back, _ = densify(low, views={"proj": MatrixView(transposed=True)})
    np.testing.assert_allclose(back["proj"]["weight"], weight, rtol=1e-4, atol=1e-4)


def test_a_plan_describes_what_it_selects_and_skips():
    from plrd_jax.transforms.plan import describe_plan

    params = {**tree(), "lora": {"kernel": w(16, 16), "A": w(16, 2), "B": w(2, 16)}}
    text = describe_plan(params, RankPlan(("decoder/*", "head"), rank=4)).splitlines()
    assert any(line.startswith("factorize decoder/layers/mlp/wi: 24×40 × 3 slices, dense → rank 4") for line in text)
    assert any(line.startswith("skip      lora: holds a kernel beside factors A/B (a LoRA adapter?)") for line in text)
    assert len(text) == 6


def test_whitened_stack_takes_per_slice_statistics_and_each_slice_meets_its_closed_form():
    """A scanned (L, d_in, d_out) kernel with stacked Grams (L, d_in, d_in): slice l is SVD-LLM's rank-r
    truncation under its own Gram, so ‖X_l (K_l − A_l B_l)‖² equals the tail Σ_{i≥r} σ_i² of L_lᵀ K_l (numpy
    float64); the reduced stack too. One unstacked Gram for a stack is refused by name."""
    from plrd_jax.transforms.calibrate import MatrixStats

    params, r = tree(), 4
    kernels = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
    xs = [rng.standard_normal((64, D)) * np.linspace(0.2, 3.0, D) ** (l + 1) for l in range(L)]
    grams = np.stack([x.T @ x for x in xs]).astype(np.float32)
    stats = {"decoder/layers/mlp/wi": MatrixStats(grams, np.zeros((L, D), np.float32), np.zeros((L, D), np.float32),
                                                  np.float32(64))}
    plan = RankPlan(("*/wi",), rank=r)

    def check(node, rank):
        for l in range(L):
            h = grams[l].astype(np.float64)
            damped = h + 1e-6 * np.mean(np.diag(h)) * np.eye(D)
            s = np.linalg.svd(np.linalg.cholesky(damped).T @ kernels[l].astype(np.float64), compute_uv=False)
            diff = kernels[l].astype(np.float64) - np.asarray(node["A"][l], np.float64) @ np.asarray(node["B"][l],
                                                                                                     np.float64)
            assert np.trace(diff.T @ damped @ diff) == pytest.approx(np.sum(s[rank:] ** 2), rel=1e-3)

    low, _ = factorize(params, plan, decomposition="whitened", stats=stats)
    check(low["decoder"]["layers"]["mlp"]["wi"], r)
    lower, _ = reduce_rank(low, {"decoder/layers/mlp/wi": 2}, decomposition="whitened", stats=stats)
    check(lower["decoder"]["layers"]["mlp"]["wi"], 2)
    one = {"decoder/layers/mlp/wi": MatrixStats(grams[0], *np.zeros((2, D), np.float32), np.float32(64))}
    with pytest.raises(PlanError, match="is a stack of 3 matrices: its statistics need one XᵀX per slice"):
        factorize(params, plan, decomposition="whitened", stats=one)
