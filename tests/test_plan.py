"""Rank plans: selection, rank rules, budgets and errors, checked against closed forms and numpy."""
import numpy as np
import pytest

from plrd_jax import ModelConfig, init_params
from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.factorize import factorize
from plrd_jax.transforms.plan import PlanError, RankPlan, find_matrices, predict_param_count, resolve_plan, resolve_ranks

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=64)

# Smallest tree a budget can reach: embed and lm_head (256·64 each), 5 norms (64 each), and the 14 attn/mlp
# matrices at rank 1, d_in + d_out each: per layer q, o 128; k, v 96; gate, up, down 192.
MIN_SIZE = 2 * 256 * 64 + 5 * 64 + 2 * (2 * 128 + 2 * 96 + 3 * 192)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG)


def plain_tree(seed=0):
    """A nested dict that is not from our model: odd shapes, biases, a 3-D kernel, a norm."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return {
        "encoder": {f"block_{i}": {"query": {"kernel": w(96, 80), "bias": w(80)},
                                   "ffn": {"wide": {"kernel": w(96, 300)}, "narrow": {"kernel": w(300, 96)}}}
                    for i in range(3)},
        "conv": {"kernel": w(3, 3, 16)},  # not a matrix
        "norm": {"scale": w(96)},
        "head": {"kernel": w(96, 500)},
    }


def test_matrices_come_from_the_tree_itself(params):
    found = find_matrices(params)
    assert list(found) == list(CONFIG.matrix_paths())
    assert all(found[p][:2] == CONFIG.matrix_shape(p) and found[p].rank is None for p in found)
    plain = find_matrices(plain_tree())
    assert "conv" not in plain and plain["head"][:3] == (96, 500, None) and len(plain) == 10


def test_groups_globs_and_regexes_select_paths(params):
    attn = resolve_ranks(params, RankPlan(matrices="attn", rank=4))
    assert sorted(attn) == sorted(p for p in CONFIG.matrix_paths() if "/attn/" in p)
    glob = resolve_ranks(params, RankPlan(matrices="layers_1/mlp/*", exclude="*/down", rank=4))
    assert sorted(glob) == ["layers_1/mlp/gate", "layers_1/mlp/up"]
    regex = resolve_ranks(params, RankPlan(matrices="re:layers_\\d+/attn/(q|o)", rank=4))
    assert sorted(regex) == ["layers_0/attn/o", "layers_0/attn/q", "layers_1/attn/o", "layers_1/attn/q"]
    assert list(resolve_ranks(params, RankPlan(matrices="lm_head", rank=4))) == ["lm_head"]


def test_fraction_rounds_to_multiples(params):
    # fraction 0.3: q (64×64) -> 19.2, gate (64×128) -> 19.2, k (64×32) -> 9.6
    down = resolve_ranks(params, RankPlan(fraction=0.3, multiple_of=8))
    near = resolve_ranks(params, RankPlan(fraction=0.3, multiple_of=8, rounding="nearest"))
    assert (down["layers_0/attn/q"], down["layers_0/attn/k"]) == (16, 8)
    assert (near["layers_0/attn/q"], near["layers_0/attn/k"]) == (16, 8)
    near = resolve_ranks(params, RankPlan(fraction=0.32, multiple_of=8, rounding="nearest"))  # 20.48, 10.24
    assert (near["layers_0/attn/q"], near["layers_0/attn/k"]) == (24, 8)
    tiny = resolve_ranks(params, RankPlan(fraction=0.01, multiple_of=8))  # never below one multiple
    assert set(tiny.values()) == {8}


def test_matrices_that_would_not_shrink_are_kept(params):
    # break-even d_in·d_out/(d_in+d_out): q 32, k 21.33, gate 42.67
    rows = {row.path: row for row in resolve_plan(params, RankPlan(rank=32))}
    assert rows["layers_0/attn/q"].action == "keep" and "needs r < 32.0" in rows["layers_0/attn/q"].reason
    assert rows["layers_0/attn/k"].action == "keep" and rows["layers_0/mlp/gate"].action == "factorize"
    assert "layers_0/attn/q" not in resolve_ranks(params, RankPlan(rank=32))
    assert resolve_ranks(params, RankPlan(matrices="attn", rank=31))["layers_0/attn/q"] == 31


def test_factorized_matrices_only_go_down(params):
    small, _ = factorize(params, RankPlan(rank=16))
    rows = {row.path: row for row in resolve_plan(small, RankPlan(fraction=0.5))}  # 32 for q, 16 for k
    assert rows["layers_0/attn/q"].rank == 16 and rows["layers_0/attn/q"].action == "keep"
    assert rows["layers_0/attn/k"].action == "keep"
    assert resolve_ranks(small, RankPlan(rank=8)) == {p: 8 for p in find_matrices(small) if p != "lm_head"}


def test_energy_rank_is_the_smallest_keeping_that_fraction_of_squared_singular_values():
    rng = np.random.default_rng(1)
    sigma = np.array([10.0, 6, 3, 1, 0.5] + [0.01] * 43)  # 48 values
    u, _ = np.linalg.qr(rng.standard_normal((96, 48)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    tree = {"w": {"kernel": (u * sigma @ v.T).astype(np.float32)}}
    energy = np.cumsum(sigma**2) / np.sum(sigma**2)
    for target in (0.5, 0.9, 0.99, 0.999):
        expected = int(np.argmax(energy >= target)) + 1
        assert resolve_ranks(tree, RankPlan(matrices="w", energy=target)) == {"w": expected}
    factored, _ = factorize(tree, {"w": 20})  # same singular values, from the factors
    assert resolve_ranks(factored, RankPlan(matrices="w", energy=0.99)) == {"w": int(np.argmax(energy >= 0.99)) + 1}


def test_budget_lands_within_one_percent_on_our_model(params):
    for share in np.linspace(0.4, 0.99, 25):
        budget = int(share * count_params(params))
        ranks = resolve_ranks(params, RankPlan(budget=budget))
        assert abs(predict_param_count(params, ranks) - budget) <= 0.01 * budget, share
        for full in (32, 64):  # one shared fraction: ranks of same-sized matrices differ by one step at most
            same = [r for p, r in ranks.items() if min(CONFIG.matrix_shape(p)) == full]
            assert max(same) - min(same) <= 1, (share, full)
    budget = int(0.7 * count_params(params))
    built, _ = factorize(params, RankPlan(budget=budget))
    assert count_params(built) == predict_param_count(params, resolve_ranks(params, RankPlan(budget=budget)))


@pytest.mark.parametrize("share", [0.6, 0.85])
def test_budget_lands_within_one_percent_on_a_plain_tree(share):
    tree = plain_tree()
    budget = int(share * count_params(tree))
    built, config = factorize(tree, RankPlan(matrices="*", budget=budget))
    assert config is None and abs(count_params(built) - budget) <= 0.01 * budget
    assert built["encoder"]["block_0"]["query"]["bias"] is tree["encoder"]["block_0"]["query"]["bias"]
    assert built["conv"]["kernel"] is tree["conv"]["kernel"]


def test_predicted_count_is_the_closed_form(params):
    ranks = {"layers_0/mlp/gate": 10, "lm_head": 3}
    expected = count_params(params) - 64 * 128 + 10 * (64 + 128) - 64 * 256 + 3 * (64 + 256)
    assert predict_param_count(params, ranks) == expected


@pytest.mark.parametrize("make, message", [
    (lambda p: RankPlan(rank=0), "rank must be positive, got 0"),
    (lambda p: RankPlan(fraction=1.5), "fraction must be in (0, 1], got 1.5"),
    (lambda p: RankPlan(fraction=0.0), "fraction must be in (0, 1], got 0.0"),
    (lambda p: RankPlan(rank=4, fraction=0.5), "exactly one of rank, fraction, energy, budget"),
    (lambda p: resolve_ranks(p, RankPlan(matrices="mlp", rank=100)),
     "rank 100 for layers_0/mlp/gate exceeds min(64, 128)"),
    (lambda p: resolve_ranks(p, RankPlan(matrices="layers_7/*", rank=4)), "pattern 'layers_7/*' matches no matrix"),
    (lambda p: resolve_ranks(p, RankPlan(matrices="embed", rank=4)), "pattern 'embed' matches no matrix"),
    (lambda p: resolve_ranks(p, RankPlan(budget=1000)), f"budget 1000 is below the minimum reachable {MIN_SIZE}"),
    (lambda p: resolve_ranks(p, RankPlan(budget=10**6)), "budget 1000000 is above the current size 106816"),
    (lambda p: factorize(p, {"layers_0/attn/o": 65}), "rank 65 for layers_0/attn/o exceeds min(64, 64)"),
    (lambda p: factorize(p, {"layers_0/attn/x": 4}), "'layers_0/attn/x' is not a matrix"),
])
def test_bad_plans_fail_with_their_message(params, make, message):
    with pytest.raises(PlanError) as error:
        make(params)
    assert message in str(error.value)



def test_budget_ranks_keep_every_layer_one_shape():
    """The budget's top-up raises a kind in every layer at once, so a uniform member's layers form one scan."""
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.config import LinearSpec, ModelConfig
    from plrd_jax.nn.layout import layer_runs
    from plrd_jax.nn.model import abstract_params

    config = ModelConfig(vocab_size=512, hidden_size=96, intermediate_size=256, num_layers=12, num_heads=6,
                         num_kv_heads=2, max_seq_len=64)
    shapes = abstract_params(config)
    for fraction in (0.9, 0.75, 0.6, 0.5, 0.4):
        budget = int(fraction * count_params(shapes))
        ranks = resolve_ranks(shapes, RankPlan(("attn", "mlp"), budget=budget))
        member = config.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
        assert layer_runs(member) == [(0, 12)], fraction
        assert abs(count_params(abstract_params(member)) - budget) <= 0.01 * budget
