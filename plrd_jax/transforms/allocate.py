"""Rank allocation: which rank each matrix gets so that the whole tree lands on a parameter budget.

Each selected matrix m has options: keep it as it is (dense, or its current rank) or take a rank r (a multiple
of `multiple_of`) whose size is below the kept size; the size of rank r is r·(d_in + d_out), plus 2·nnz when
the member is sparse-plus-low-rank (`sparse_density` δ: nnz = ⌊δ·d_in·d_out⌋ values and as many int32
indices, both counted). The whole tree must land within 1% of `budget` (parameters, embeddings included).

  uniform      one rank fraction f shared by all: r_m = f·min(d_in, d_out), rounded down to the multiple
               (the rule of `RankPlan(budget=...)`), f found by bisection
  energy       one energy level e shared by all: r_m = the smallest r keeping Σ_{i<r} s_i² ≥ e·Σ s_i² of the
               decomposition's own spectrum (whitened: e is the fraction of the output energy ‖XK‖² kept)
  sensitivity  minimize Σ_m cost_m(r_m) subject to the budget, cost_m(r) being
                 "output": the relative output error ‖X(K − K_r)‖² / ‖XK‖² on the calibration inputs
                 "fisher": ½·Σ_i f_i ‖(K − K_r)_i‖² / d_out, the Fisher (second-order) estimate of the loss
                           increase, f_i = Fisher row sums (calibrate(..., fisher=True))
               or any costs the caller measured (`costs`); solved by
                 "greedy":   the lower convex hull of each matrix's (parameters saved, cost) points, segments
                             taken in order of cost per parameter saved until the budget is met
                 "knapsack": exact multiple-choice knapsack by dynamic programming over the parameters saved
                             (in 1/20000 steps of what must be saved; rounded so the budget is never exceeded)

Costs and energies come from the `Spectrum` of each matrix under the chosen decomposition (`spectra`, or
computed here from params, decomposition and stats), so the allocation sees what that decomposition would do.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import numpy as np

from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.decompositions import (Decomposition, Spectrum, as_decomposition, check_stats, decompose,
                                                decompose_factors, output_errors)
from plrd_jax.transforms.plan import PlanError, find_matrices, node_at, select, top_up
from plrd_jax.transforms.sparse import sparse_nnz

ALLOCATIONS = ("uniform", "energy", "sensitivity")
SENSITIVITIES = ("output", "fisher")
SOLVERS = ("greedy", "knapsack")
KNAPSACK_STEPS = 20000
TOLERANCE = 0.01


class Options(NamedTuple):
    """The choices for one matrix: ranks[0] = None is "keep as it is"; sizes in parameters."""

    path: str
    d_in: int
    d_out: int
    ranks: list  # [None, r_1 > r_2 > ...]
    sizes: np.ndarray  # int64, sizes[0] = the kept size


@dataclasses.dataclass(frozen=True)
class Allocation:
    """ranks: path -> rank for every matrix that changes (others are kept); params: the tree's size after;
    cost: Σ cost of the chosen options (sensitivity only)."""

    ranks: dict[str, int]
    params: int
    budget: int
    allocation: str
    decomposition: str
    solver: str | None = None
    sensitivity: str | None = None
    sparse_density: float = 0.0
    cost: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ranks_by_layer": ranks_by_layer(self.ranks)}


def ranks_by_layer(ranks: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """{"layers_3": {"q": 128, ...}, "lm_head": {"lm_head": 64}}: the ranks grouped by layer and matrix kind."""
    table: dict[str, dict[str, int]] = {}
    for path, r in ranks.items():
        parts = path.split("/")
        table.setdefault(parts[0], {})[parts[-1]] = int(r)
    return table


def matrix_options(params, paths, multiple_of: int = 1, sparse_density: float = 0.0) -> list[Options]:
    """The options of each path (module docstring)."""
    matrices = find_matrices(params)
    out = []
    for path in paths:
        m = matrices[path]
        if m.count > 1 or m.view.transposed or "kernel" not in node_at(params, path) and m.rank is None:
            raise PlanError(f"{path} is a stack of {m.count} matrices or not a flax kernel: non-uniform allocation "
                            "reads single 2-D matrices; give it a rank, fraction or budget plan instead")
        kept = m.size
        extra = 2 * sparse_nnz(m.d_in, m.d_out, sparse_density)
        top = min(m.d_in, m.d_out) if m.rank is None else m.rank
        ranks = [r for r in range(multiple_of * (top // multiple_of), 0, -multiple_of)
                 if r * (m.d_in + m.d_out) + extra < kept and (m.rank is None or r < m.rank)]
        sizes = np.array([kept] + [r * (m.d_in + m.d_out) + extra for r in ranks], np.int64)
        out.append(Options(path, m.d_in, m.d_out, [None] + ranks, sizes))
    return out


def selected_paths(params, matrices=("attn", "mlp"), exclude=()) -> list[str]:
    paths = list(find_matrices(params))
    excluded = set(select(paths, exclude))
    return [p for p in select(paths, matrices) if p not in excluded]


def compute_spectra(params, paths, decomposition="svd", stats=None) -> dict[str, Spectrum]:
    """path -> the decomposition's `Spectrum` of that matrix (its kernel, or the product of its factors)."""
    decomposition = as_decomposition(decomposition)
    out = {}
    for path in paths:
        node = node_at(params, path)
        s = None if stats is None else stats.get(path)
        check_stats(decomposition, s, path)
        out[path] = (decompose(node["kernel"], decomposition, s) if "kernel" in node else
                     decompose_factors(node["A"], node["B"], decomposition, s))
    return out


def rank_costs(options: list[Options], spectra: Mapping[str, Spectrum], stats, sensitivity: str = "output"
               ) -> dict[str, np.ndarray]:
    """path -> cost of each option (cost[0] = keep = 0), from the spectra and the calibration stats."""
    if sensitivity not in SENSITIVITIES:
        raise PlanError(f"unknown sensitivity {sensitivity!r}; expected one of {', '.join(SENSITIVITIES)}")
    costs = {}
    for o in options:
        s = stats.get(o.path) if stats is not None else None
        if s is None:
            raise PlanError(f"sensitivity {sensitivity!r} needs calibration statistics for {o.path}")
        if sensitivity == "output":
            errors = output_errors(spectra[o.path], s.xtx)
            errors = errors / max(errors[0], 1e-30)
        else:
            fisher = np.asarray(s.fisher_rows, np.float64)
            if not fisher.any():
                raise PlanError(f"sensitivity 'fisher' needs Fisher rows for {o.path}: calibrate(..., fisher=True)")
            errors = output_errors(spectra[o.path], fisher) / (2 * o.d_out)
        costs[o.path] = np.array([0.0] + [errors[r] for r in o.ranks[1:]])
    return costs


# ---- the three rules ------------------------------------------------------------------------------------
def _total(fixed: int, options: list[Options], choice: list[int]) -> int:
    return fixed + int(sum(o.sizes[c] for o, c in zip(options, choice)))


def _bisect(rule: Callable[[float], list[int]], fixed: int, options: list[Options], budget: int,
            lo: float, hi: float) -> list[int]:
    """The choice of `rule(t)` (size increasing with t) nearest the budget: bisection between t=lo and t=hi,
    then matrices whose choice differs between the bracketing values take the larger option while that brings
    the size nearer, a kind across layers at a time before single matrices (`plan.top_up`)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _total(fixed, options, rule(mid)) <= budget else (lo, mid)
    chosen, upper = rule(lo), rule(hi)
    steps = [int(o.sizes[upper[i]] - o.sizes[chosen[i]]) for i, o in enumerate(options)]
    for i in top_up([o.path for o in options], [(o.d_in, o.d_out, tuple(o.ranks)) for o in options], steps,
                    _total(fixed, options, chosen), budget, TOLERANCE):
        chosen[i] = upper[i]
    return chosen


def _pick(o: Options, r: int) -> int:
    """Index of the largest option with rank <= r that saves parameters (0 = keep when none is below r)."""
    for i, rank in enumerate(o.ranks[1:], 1):
        if rank <= r:
            return i
    return len(o.ranks) - 1


def _uniform_choice(options: list[Options], multiple_of: int) -> Callable[[float], list[int]]:
    def rule(f):
        choice = []
        for o in options:
            full = min(o.d_in, o.d_out)
            r = min(max(math.floor(f * full / multiple_of + 1e-9), 1) * multiple_of, full)
            choice.append(0 if len(o.ranks) == 1 or r > o.ranks[1] else _pick(o, r))
        return choice
    return rule


def _energy_choice(options: list[Options], spectra: Mapping[str, Spectrum]) -> Callable[[float], list[int]]:
    kept = {}
    for o in options:
        sq = np.asarray(spectra[o.path].s, np.float64) ** 2
        kept[o.path] = np.cumsum(sq) / max(sq.sum(), 1e-30)

    def rule(e):
        choice = []
        for o in options:
            r = int(np.searchsorted(kept[o.path], e - 1e-12) + 1)  # smallest r keeping energy e
            ranks = o.ranks[1:]
            if not ranks or r > ranks[0]:
                choice.append(0)
            else:  # the smallest allowed rank >= r
                choice.append(max(i for i, rank in enumerate(ranks, 1) if rank >= r))
        return choice
    return rule


def _hull(savings: np.ndarray, costs: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points (saving, cost), from saving 0 upwards."""
    order = np.lexsort((costs, savings))
    hull: list[int] = []
    for i in order:
        if hull and savings[i] == savings[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (savings[b] - savings[a]) * (costs[i] - costs[a]) - (costs[b] - costs[a]) * (savings[i] - savings[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _greedy(options: list[Options], costs: Mapping[str, np.ndarray], need: int) -> list[int]:
    """Convex-hull segments of all matrices in order of cost per parameter saved, until `need` is saved."""
    segments = []
    for m, o in enumerate(options):
        savings = (o.sizes[0] - o.sizes).astype(np.float64)
        hull = _hull(savings, costs[o.path])
        for a, b in zip(hull, hull[1:]):
            slope = (costs[o.path][b] - costs[o.path][a]) / (savings[b] - savings[a])
            segments.append((slope, m, savings[a], b))
    segments.sort(key=lambda s: (s[0], s[2]))
    choice, saved, last = [0] * len(options), 0, None
    for _, m, _, b in segments:
        if saved >= need:
            break
        o = options[m]
        saved += int(o.sizes[choice[m]] - o.sizes[b])
        choice[m], last = b, m
    if last is not None:  # the last step may overshoot: its matrix takes its cheapest option that still suffices
        o = options[last]
        others = saved - int(o.sizes[0] - o.sizes[choice[last]])
        enough = [i for i in range(len(o.ranks)) if others + int(o.sizes[0] - o.sizes[i]) >= need]
        choice[last] = min(enough, key=lambda i: (costs[o.path][i], -o.sizes[i]))
    return choice


def _knapsack(options: list[Options], costs: Mapping[str, np.ndarray], need: int) -> list[int]:
    """min Σ cost subject to Σ saving ≥ need; savings floored to units of need / KNAPSACK_STEPS."""
    unit = max(need / KNAPSACK_STEPS, 1.0)
    steps = int(math.ceil(need / unit))
    best = np.full(steps + 1, np.inf)
    best[0] = 0.0
    picks = []
    for o in options:
        units = np.floor((o.sizes[0] - o.sizes) / unit).astype(np.int64)
        new = np.full(steps + 1, np.inf)
        arg = np.zeros(steps + 1, np.int32)
        for i, (u, c) in enumerate(zip(units, costs[o.path])):
            # reaching >= j units with this option: from >= max(j - u, 0) units before
            shifted = best[np.maximum(np.arange(steps + 1) - u, 0)] + c
            better = shifted < new
            new[better], arg[better] = shifted[better], i
        best = new
        picks.append(arg)
    if not np.isfinite(best[steps]):
        raise PlanError("the budget cannot be reached even at the smallest rank of every matrix")
    choice, j = [0] * len(options), steps
    for m in range(len(options) - 1, -1, -1):
        i = int(picks[m][j])
        choice[m] = i
        u = int(np.floor((options[m].sizes[0] - options[m].sizes[i]) / unit))
        j = max(j - u, 0)
    return choice


# ---- entry point ----------------------------------------------------------------------------------------
def allocate_ranks(params, budget: int, allocation: str = "uniform", *, matrices=("attn", "mlp"), exclude=(),
                   multiple_of: int = 1, decomposition: str | Decomposition = "svd", stats=None,
                   spectra: Mapping[str, Spectrum] | None = None, sensitivity: str = "output",
                   solver: str = "greedy", costs: Mapping[str, np.ndarray] | None = None,
                   sparse_density: float = 0.0) -> Allocation:
    """Ranks for the selected matrices (group names, globs or "re:" patterns, as in `RankPlan`) that bring the
    whole tree within 1% of `budget` parameters, by `allocation` (module docstring).

    spectra: path -> `Spectrum` of the decomposition (computed when not given: energy and sensitivity need them);
    costs: path -> cost per option of `matrix_options` (overrides `sensitivity`, e.g. measured loss increases).
    Apply the result with `factorize` / `reduce_rank` (same decomposition) or `sparse_plus_lowrank`.
    """
    if allocation not in ALLOCATIONS:
        raise PlanError(f"unknown allocation {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    if solver not in SOLVERS:
        raise PlanError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if not 0 <= sparse_density < 1:
        raise PlanError(f"sparse_density must be in [0, 1), got {sparse_density}")
    if multiple_of < 1:
        raise PlanError(f"multiple_of must be >= 1, got {multiple_of}")
    decomposition = as_decomposition(decomposition)
    paths = selected_paths(params, matrices, exclude)
    options = matrix_options(params, paths, multiple_of, sparse_density)
    fixed = count_params(params) - int(sum(o.sizes[0] for o in options))
    current = count_params(params)
    smallest = fixed + int(sum(o.sizes[-1] for o in options))
    if budget > current:
        raise PlanError(f"budget {budget} is above the current size {current}")
    if budget < smallest:
        raise PlanError(f"budget {budget} is below the minimum reachable {smallest} "
                        f"(rank {multiple_of} on every selected matrix)")
    if allocation != "uniform" and spectra is None:
        spectra = compute_spectra(params, paths, decomposition, stats)
    cost_total = None
    if allocation == "uniform":
        choice = _bisect(_uniform_choice(options, multiple_of), fixed, options, budget, 0.0, 1.0)
    elif allocation == "energy":
        choice = _bisect(_energy_choice(options, spectra), fixed, options, budget, 0.0, 1.0)
    else:
        if costs is None:
            costs = rank_costs(options, spectra, stats, sensitivity)
        else:
            sensitivity = "given"
        need = current - budget
        choice = (_greedy if solver == "greedy" else _knapsack)(options, costs, need)
        cost_total = float(sum(costs[o.path][c] for o, c in zip(options, choice)))
    size = _total(fixed, options, choice)
    if abs(size - budget) > TOLERANCE * budget:
        raise PlanError(f"budget {budget} cannot be met within 1% by {allocation} allocation: the nearest "
                        f"reachable size is {size} (a smaller multiple_of gives finer steps)")
    ranks = {o.path: o.ranks[c] for o, c in zip(options, choice) if c}
    sensitive = allocation == "sensitivity"
    return Allocation(ranks, size, budget, allocation, decomposition.method, solver if sensitive else None,
                      sensitivity if sensitive else None, sparse_density, cost_total)


# ---- picture --------------------------------------------------------------------------------------------
