"""One member from a model in one call: the plan's matrices at its size, ranks chosen by an allocation, factors
by a decomposition (`compress`)."""
from __future__ import annotations

from plrd_jax.nn.layout import stack_layers, stores_stacked, unstack_layers
from plrd_jax.transforms.allocate import allocate_ranks, compute_spectra, ranks_by_layer, selected_paths
from plrd_jax.transforms.decompositions import describe_scaling, scaling_report
from plrd_jax.transforms.factorize import reduce_rank
from plrd_jax.transforms.plan import PlanError, RankPlan, resolve_ranks


def compress(params, plan: RankPlan, config=None, *, allocation: str = "uniform", stats=None,
             solver: str = "greedy", sensitivity: str = "output"):
    """One member from `params` (dense or factorized): the plan's matrices at its size, ranks chosen by
    `allocation` (non-uniform ones need `plan.budget`), factors by `plan.decomposition` (`reduce_rank`).

    With a `config`, `params` in either layout (`nn.layout.stack_layers`), the result stacked when the new
    config's layers all share one shape and it scans them (`stores_stacked`), else per layer; without one, any
    tree, its stacks (a `layers` key) read as MaxText's (`transforms.views`).

    Returns (params, config, report), report = {"decomposition", "allocation", "ranks_by_layer"}, plus
    "scalings" (how many matrices used each input scaling, e.g. {"cholesky (damping 1e-06)": 210}) and
    "fallbacks" (path -> scaling of every matrix whose whitening fell back, `scaling_report`) when the
    decomposition needs statistics or the allocation is not uniform, and "solver" / "sensitivity" for a
    non-uniform allocation.
    """
    if config is not None:  # our decoder: the plan and the statistics address its matrices per layer
        params = unstack_layers(params)
    decomposition = plan.decomposition
    if allocation != "uniform" and plan.budget is None:
        raise PlanError(f"allocation {allocation!r} needs a parameter budget (RankPlan(budget=...)), not a rank rule")
    spectra, report = None, {"decomposition": decomposition.method, "allocation": allocation}
    if allocation == "uniform":
        ranks = resolve_ranks(params, plan)
    else:
        ranks = None
    if decomposition.needs_stats or allocation != "uniform":
        paths = selected_paths(params, plan.matrices, plan.exclude) if ranks is None else list(ranks)
        spectra = compute_spectra(params, paths, decomposition, stats)
        report.update(scaling_report(decomposition, {p: describe_scaling(spectra[p].scaling) for p in paths}))
    if ranks is None:
        result = allocate_ranks(params, plan.budget, allocation, matrices=plan.matrices, exclude=plan.exclude,
                                multiple_of=plan.multiple_of, decomposition=decomposition, stats=stats, spectra=spectra,
                                sensitivity=sensitivity, solver=solver)
        ranks = result.ranks
        report.update(solver=solver, sensitivity=sensitivity)
    new_params, new_config = reduce_rank(params, ranks, config, stats=stats, decomposition=decomposition,
                                         spectra=spectra)
    report["ranks_by_layer"] = ranks_by_layer(ranks)
    if new_config is not None and stores_stacked(new_config):
        new_params = stack_layers(new_params, new_config)
    return new_params, new_config, report
