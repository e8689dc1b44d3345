"""Rank allocation: budgets met within 1%, solvers against brute force, costs against direct computation."""
import itertools

import jax

import numpy as np
import pytest

from plrd_jax import ModelConfig, count_params, init_params
from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.transforms.factorize import factorize
from plrd_jax.transforms.plan import PlanError, RankPlan, resolve_ranks
from plrd_jax.reporting.plots import plot_rank_heatmap
from plrd_jax.transforms.allocate import Options, _greedy, _knapsack, allocate_ranks, compute_spectra, matrix_options, rank_costs, ranks_by_layer
from plrd_jax.transforms.decompositions import decomposed_factors

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                     num_kv_heads=2, max_seq_len=32)
WINDOWS = np.random.default_rng(0).integers(0, 128, (4, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    params = init_params(CONFIG, seed=3)
    stats = calibrate(CONFIG, params, WINDOWS, fisher=True)
    return params, stats, compute_spectra(params, list(stats), "whitened", stats)


CASES = [("uniform", "greedy"), ("energy", "greedy"), ("sensitivity", "greedy"), ("sensitivity", "knapsack")]


@pytest.mark.parametrize("allocation,solver", CASES)
@pytest.mark.parametrize("keep", [0.9, 0.7, 0.55])
def test_budget_is_met_within_one_percent(model, allocation, solver, keep):
    params, stats, spectra = model
    budget = int(keep * count_params(params))
    result = allocate_ranks(params, budget, allocation, decomposition="whitened", stats=stats, spectra=spectra,
                            solver=solver, multiple_of=4)
    assert abs(result.params - budget) <= 0.01 * budget
    built, config = factorize(params, result.ranks, CONFIG, stats=stats, decomposition="whitened")
    assert count_params(built) == result.params
    assert all(r % 4 == 0 for r in result.ranks.values())
    assert result.to_dict()["ranks_by_layer"]["layers_0"] == {
        p.rsplit("/", 1)[1]: r for p, r in result.ranks.items() if p.startswith("layers_0/")}


def test_uniform_is_the_budget_rule_of_rank_plans(model):
    params, _, _ = model
    budget = int(0.7 * count_params(params))
    assert allocate_ranks(params, budget, "uniform", multiple_of=4).ranks == resolve_ranks(
        params, RankPlan(budget=budget, multiple_of=4))


def test_sensitivity_costs_less_than_uniform(model):
    params, stats, spectra = model
    budget = int(0.6 * count_params(params))
    options = matrix_options(params, list(spectra), 4)
    costs = rank_costs(options, spectra, stats, "output")

    def total(ranks):
        return sum(costs[o.path][o.ranks.index(ranks.get(o.path))] for o in options)

    uniform = allocate_ranks(params, budget, "uniform", multiple_of=4)
    greedy = allocate_ranks(params, budget, "sensitivity", stats=stats, spectra=spectra, multiple_of=4)
    knapsack = allocate_ranks(params, budget, "sensitivity", stats=stats, spectra=spectra, multiple_of=4,
                              solver="knapsack")
    assert greedy.cost == pytest.approx(total(greedy.ranks))
    assert knapsack.cost <= greedy.cost * (1 + 1e-9) and greedy.cost < total(uniform.ranks)


def test_output_and_fisher_costs_are_the_weighted_errors(model):
    params, stats, spectra = model
    path = "layers_1/mlp/down"
    [options] = matrix_options(params, [path], 8)
    kernel = np.asarray(params["layers_1"]["mlp"]["down"]["kernel"], np.float64)
    s = stats[path]
    for sensitivity in ("output", "fisher"):
        costs = rank_costs([options], spectra, stats, sensitivity)[path]
        for i in (1, 3):
            a, b = decomposed_factors(params["layers_1"]["mlp"]["down"]["kernel"], options.ranks[i], "whitened", s)
            diff = kernel - np.asarray(a, np.float64) @ np.asarray(b, np.float64)
            if sensitivity == "output":
                want = np.sum(diff * (np.asarray(s.xtx, np.float64) @ diff)) / np.sum(
                    kernel * (np.asarray(s.xtx, np.float64) @ kernel))
            else:
                want = 0.5 * np.sum(np.asarray(s.fisher_rows, np.float64)[:, None] * diff ** 2) / kernel.shape[1]
            assert costs[i] == pytest.approx(want, rel=2e-3)


def brute_force(options, costs, need):
    best = None
    for choice in itertools.product(*[range(len(o.ranks)) for o in options]):
        saved = sum(o.sizes[0] - o.sizes[c] for o, c in zip(options, choice))
        cost = sum(costs[o.path][c] for o, c in zip(options, choice))
        if saved >= need and (best is None or cost < best[0]):
            best = (cost, choice)
    return best


def synthetic(seed, convex):
    rng = np.random.default_rng(seed)
    options, costs = [], {}
    for m in range(4):
        n = 5
        sizes = np.array([1000] + sorted(rng.choice(np.arange(10, 990, 10), n - 1, replace=False))[::-1], np.int64)
        savings = (sizes[0] - sizes) / 1000
        c = savings ** 2 * rng.uniform(0.5, 3) if convex else np.concatenate([[0], np.sort(rng.uniform(0, 3, n - 1))])
        options.append(Options(f"m{m}", 1, 1, [None] + list(range(n - 1, 0, -1)), sizes))
        costs[f"m{m}"] = c
    return options, costs


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_is_optimal(seed):
    options, costs = synthetic(seed, convex=False)
    need = 1700
    choice = _knapsack(options, costs, need)
    cost = sum(costs[o.path][c] for o, c in zip(options, choice))
    assert sum(o.sizes[0] - o.sizes[c] for o, c in zip(options, choice)) >= need
    assert cost == pytest.approx(brute_force(options, costs, need)[0])


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_near_optimal_for_convex_costs(seed):
    options, costs = synthetic(seed, convex=True)
    need = 1700
    choice = _greedy(options, costs, need)
    cost = sum(costs[o.path][c] for o, c in zip(options, choice))
    assert sum(o.sizes[0] - o.sizes[c] for o, c in zip(options, choice)) >= need
    best = brute_force(options, costs, need)[0]
    assert best <= cost <= best + max(np.diff(costs[o.path]).max() for o in options)


def test_sparse_overhead_is_counted(model):
    params, _, _ = model
    [plain] = matrix_options(params, ["layers_0/mlp/up"], 1)
    [sparse] = matrix_options(params, ["layers_0/mlp/up"], 1, sparse_density=0.05)
    nnz = int(0.05 * 64 * 96)
    assert sparse.sizes[0] == plain.sizes[0] == 64 * 96
    r = sparse.ranks[1]
    assert sparse.sizes[1] == r * (64 + 96) + 2 * nnz and r < plain.ranks[1]


def test_heatmap_and_table(model, tmp_path):
    params, _, _ = model
    result = allocate_ranks(params, int(0.7 * count_params(params)), "uniform")
    shapes = {p: CONFIG.matrix_shape(p) for p in CONFIG.matrix_paths()}
    plot_rank_heatmap(str(tmp_path / "ranks.png"), result.ranks, shapes)
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ranks_by_layer({"layers_2/attn/q": 8, "lm_head": 4}) == {"layers_2": {"q": 8}, "lm_head": {"lm_head": 4}}


def test_errors(model):
    params, stats, _ = model
    n = count_params(params)
    with pytest.raises(PlanError, match="unknown allocation 'best'"):
        allocate_ranks(params, n // 2, "best")
    with pytest.raises(PlanError, match="above the current size"):
        allocate_ranks(params, n + 1)
    with pytest.raises(PlanError, match="below the minimum reachable"):
        allocate_ranks(params, n // 10)
    with pytest.raises(PlanError, match="needs calibration statistics"):
        allocate_ranks(params, n - 2000, "sensitivity", spectra=compute_spectra(params, ["layers_0/attn/q"]),
                       matrices=("layers_0/attn/q",))


def test_compress_is_allocation_then_reduce_rank(model):
    from plrd_jax.transforms.factorize import reduce_rank
    from plrd_jax.transforms.compress import compress

    params, stats, spectra = model
    budget = int(0.7 * count_params(params))
    plan = RankPlan(budget=budget, multiple_of=4, decomposition="whitened")
    member, config, report = compress(params, plan, CONFIG, allocation="sensitivity", stats=stats)
    ranks = allocate_ranks(params, budget, "sensitivity", multiple_of=4, decomposition="whitened", stats=stats,
                           spectra=spectra).ranks
    want, want_config = reduce_rank(params, ranks, CONFIG, stats=stats, decomposition="whitened")
    assert config == want_config and report["ranks_by_layer"] == ranks_by_layer(ranks)
    assert sum(report["scalings"].values()) == len(spectra) - 1 and report["allocation"] == "sensitivity"
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    plain, plain_config, _ = compress(params, RankPlan(budget=budget, multiple_of=4), CONFIG)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), plain,
                                     reduce_rank(params, RankPlan(budget=budget, multiple_of=4), CONFIG)[0]))
    with pytest.raises(PlanError, match="needs a parameter budget"):
        compress(params, RankPlan(rank=4), CONFIG, allocation="energy")


def test_family_members_follow_the_schedule_decomposition_and_allocation(tmp_path):
    """A progressive family whose members are whitened and sensitivity-allocated: each stage calibrates its
    source (the healed previous member) and lands on its budget; the choice is recorded in the metadata."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from family_run import CONFIG as TINY, tiny_data

    from plrd_jax.methods.plrd import Schedule, Stage, run_family
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.training.optim import HealConfig

    heal, evals = tiny_data()
    parent = init_params(TINY, seed=0)
    n = count_params(parent)
    schedule = Schedule((Stage("a", budget_fraction=0.85, heal_tokens=4 * 16), Stage("b", budget_fraction=0.7)),
                        batch_size=4, seq_len=16, heal=HealConfig(lr=3e-3, warmup_steps=0, total_steps=1),
                        decomposition="whitened", allocation="sensitivity", calibration_windows=8)
    store = FamilyStore(tmp_path / "fam")
    results = run_family("tiny", TINY, parent, schedule, heal, evals, store)
    members = store.members()
    store.close()
    for fraction, result, meta in zip((0.85, 0.7), results, members):
        assert abs(result.params - fraction * n) <= 0.01 * fraction * n
        report = meta["decomposition_report"]
        assert report["decomposition"] == "whitened" and report["allocation"] == "sensitivity"
        assert sum(report["scalings"].values()) > 0 and report["ranks_by_layer"]
    assert members[1]["config"]["linears"] and results[1].params < results[0].params
