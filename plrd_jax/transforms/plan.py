"""Rank plans: which matrices of a param tree get which rank.

A *matrix* is a dict in a nested param tree holding a `kernel`, a `weight` or the factors `A`, `B` of K = A B
(views.py: which nodes are matrices, N-D and stacked kernels, what is skipped and why). It is addressed by
its '/'-joined path, e.g. "layers_3/attn/q"; a stacked node (scanned layers) is one matrix of `count` slices
that share one rank.
A `RankPlan` is data; `resolve_plan` turns it into concrete ranks from the tree's shapes alone (and, for an
`energy` plan, from the singular values), so it works on any nested dict and on `jax.eval_shape` output.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.nn.accounting import count_params
from plrd_jax.transforms.decompositions import Decomposition, as_decomposition
from plrd_jax.transforms.views import (Matrix, MatrixView, factor_stacks, find_matrices,  # noqa: F401
                                      kernel_stack, scan_tree)

# Group name -> regex over paths. Our decoder's names; any other tree uses globs or "re:" patterns.
GROUPS = {
    "attn": r"(.*/)?(q|k|v|o)",
    "qkvo": r"(.*/)?(q|k|v|o)",
    "mlp": r"(.*/)?(gate|up|down)",
    "embed": r"(.*/)?embed",
    "lm_head": r"(.*/)?lm_head",
}
ROUNDINGS = ("down", "nearest")


class PlanError(ValueError):
    """A rank plan that cannot be applied to the given params."""


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """Which matrices get which rank; exactly one of `rank`, `fraction`, `energy`, `budget`.

    matrices: patterns selecting matrices by path: a group name (`GROUPS`), "re:<regex>" (full match) or a
      glob (fnmatch: '*' also crosses '/'); `exclude`: patterns taken out of that selection.
    rank: r everywhere.  fraction: r = fraction · min(d_in, d_out).
    energy: the smallest r with Σ_{i<r} σ_i² ≥ energy · Σ_i σ_i².
    budget: parameter count of the WHOLE tree (embeddings, norms, biases included), reached by one fraction
      shared by the selected matrices, found by bisection and landing within 1% (matrices whose rounded rank
      jumps at that fraction take the lower or the higher rank, whichever lands nearer).
    Derived ranks (all but `rank`) are rounded to a multiple of `multiple_of` ("down" or "nearest", at least
    one multiple). A dense matrix is factorized only when that saves parameters, r < d_in·d_out/(d_in+d_out);
    a factorized one only ever goes down in rank. Anything else stays as it is (see `resolve_plan`).
    decomposition: how factorize / reduce_rank compute the rank-r factors ("svd", "whitened", "asvd", "fisher"
    or a `Decomposition`; all but "svd" need calibration statistics).
    """

    matrices: tuple[str, ...] = ("attn", "mlp")
    exclude: tuple[str, ...] = ()
    rank: int | None = None
    fraction: float | None = None
    energy: float | None = None
    budget: int | None = None
    multiple_of: int = 1
    rounding: str = "down"
    decomposition: str | Decomposition = "svd"
    views: tuple[tuple[str, MatrixView], ...] = ()  # (glob, MatrixView) pairs overriding views.default_view

    def __post_init__(self):
        object.__setattr__(self, "decomposition", as_decomposition(self.decomposition))
        views = self.views.items() if isinstance(self.views, Mapping) else self.views
        object.__setattr__(self, "views", tuple((p, MatrixView(*v)) for p, v in views))
        for name in ("matrices", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        rules = [n for n in ("rank", "fraction", "energy", "budget") if getattr(self, n) is not None]
        if len(rules) != 1:
            raise PlanError(f"a rank plan needs exactly one of rank, fraction, energy, budget; got {rules or 'none'}")
        if self.rank is not None and self.rank <= 0:
            raise PlanError(f"rank must be positive, got {self.rank}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise PlanError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise PlanError(f"energy must be in (0, 1], got {self.energy}")
        if self.budget is not None and self.budget <= 0:
            raise PlanError(f"budget must be a positive parameter count, got {self.budget}")
        if self.multiple_of < 1:
            raise PlanError(f"multiple_of must be >= 1, got {self.multiple_of}")
        if self.rounding not in ROUNDINGS:
            raise PlanError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")


class MatrixPlan(NamedTuple):
    """One row of a resolved plan. action: "factorize" (dense -> A, B), "reduce" (lower rank) or "keep"."""

    path: str
    shape: tuple[int, int]
    rank: int | None  # current rank, None when dense
    target: int
    action: str
    reason: str = ""


def select(paths, patterns, skipped: Mapping[str, str] | None = None) -> list[str]:
    """Paths matched by any pattern (group name, "re:<regex>" or glob); each pattern must match something.
    A pattern that matches only `skipped` nodes (path -> reason) names them and the reason."""
    chosen = set()
    for pattern in patterns:
        if pattern in GROUPS or pattern.startswith("re:"):
            regex = re.compile(GROUPS.get(pattern) or pattern[3:])
            match = regex.fullmatch
        else:
            match = lambda p, pattern=pattern: fnmatch.fnmatchcase(p, pattern)  # noqa: E731
        hits = {p for p in paths if match(p)}
        if not hits:
            near = [f"{p} ({why})" for p, why in (skipped or {}).items() if match(p)]
            if near:
                raise PlanError(f"pattern {pattern!r} matches no matrix; it matches {'; '.join(near[:3])}")
            shown = ", ".join(list(paths)[:4]) + (", ..." if len(paths) > 4 else "")
            raise PlanError(f"pattern {pattern!r} matches no matrix (matrices are e.g. {shown or 'none'})")
        chosen |= hits
    return [p for p in paths if p in chosen]


def singular_values(k_or_a: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """Singular values (descending, float32 or wider) of K, or of A B without forming it: σ(R_A R_Bᵀ).
    Leading axes of 3-D inputs are slices: one row of singular values each."""
    dtype = jnp.promote_types(k_or_a.dtype, jnp.float32)
    if b is None:
        return jnp.linalg.svd(k_or_a.astype(dtype), compute_uv=False)
    r_a = jnp.linalg.qr(k_or_a.astype(dtype), mode="r")
    r_b = jnp.linalg.qr(jnp.swapaxes(b, -1, -2).astype(dtype), mode="r")
    return jnp.linalg.svd(jnp.matmul(r_a, jnp.swapaxes(r_b, -1, -2), precision="highest"), compute_uv=False)


def node_at(params, path: str):
    """The node at `path` ("layers_0/attn/q") of a nested dict."""
    for key in path.split("/"):
        params = params[key]
    return params


def _rounded(x: float, full: int, plan: RankPlan) -> int:
    step = plan.multiple_of
    multiples = math.floor(x / step + 1e-9) if plan.rounding == "down" else math.floor(x / step + 0.5)
    return min(max(multiples, 1) * step, full)


def _energy_rank(node, m: Matrix, energy: float) -> int:
    """The smallest r with Σ_{i<r} σ_i² ≥ energy · Σ σ_i² in every slice of the node (the largest slice's r)."""
    if m.rank is None:
        sv = singular_values(kernel_stack(node, m))
    else:
        sv = singular_values(*factor_stacks(node, m))
    try:
        sq = np.asarray(sv, np.float64).reshape(m.count, -1) ** 2
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise PlanError("an energy plan needs concrete singular values: resolve it outside jit "
                        "(resolve_ranks) and pass the ranks dict") from None
    kept = np.cumsum(sq, axis=1) / sq.sum(axis=1, keepdims=True)
    return int(max(np.searchsorted(row, energy - 1e-12) + 1 for row in kept))


def _size_after(m: Matrix, r: int) -> int:
    if m.rank is None:
        return m.count * r * (m.d_in + m.d_out) if r * (m.d_in + m.d_out) < m.d_in * m.d_out else m.size
    return m.count * min(r, m.rank) * (m.d_in + m.d_out)


def top_up(paths, keys, steps, size: int, budget: int, tolerance: float = 0.01) -> list[int]:
    """Which matrices a budget's top-up raises (indices into `paths`): raising matrix i adds steps[i] parameters
    to `size`, and a group is raised while that brings the count nearer `budget`. Groups are first one per matrix
    kind and `keys` entry (shape) across layers — "layers_3/attn/q" with "layers_0/attn/q", so that a decoder's
    layers keep one shape and run under one scan —, and, only when that ends more than `tolerance` off, every
    matrix alone, from the start again (tree order)."""
    kinds: dict[tuple, list[int]] = {}
    for i, (path, key) in enumerate(zip(paths, keys)):
        kinds.setdefault((re.sub(r"^layers_[0-9]+/", "", path), key), []).append(i)
    for groups in (list(kinds.values()), [[i] for i in range(len(paths))]):
        raised, total = [], size
        for group in groups:
            step = sum(steps[i] for i in group)
            if abs(total + step - budget) < abs(total - budget):
                raised, total = raised + group, total + step
        if abs(total - budget) <= tolerance * budget:
            break
    return raised


def _budget_ranks(params, matrices: dict[str, Matrix], selected: list[str], plan: RankPlan) -> dict[str, int]:
    """Ranks round(f · min(d_in, d_out)) for the one fraction f that brings the tree nearest `plan.budget`.

    Bisection brackets the budget between two neighbouring fractions f_lo < f_hi; the matrices whose rank
    differs between them then take the higher rank while that brings the count nearer: a whole kind at a time
    (layer i's attn/q with every other layer's, so that the layers keep one shape and run under one scan,
    `nn.layout.stores_stacked`), or, when that cannot come within 1 %, one matrix at a time in tree order.
    """
    fixed = count_params(params) - sum(matrices[p].size for p in selected)

    def ranks(f):
        return {p: _rounded(f * min(matrices[p][:2]), min(matrices[p][:2]), plan) for p in selected}

    def count(rs):
        return fixed + sum(_size_after(matrices[p], r) for p, r in rs.items())

    smallest, current = count(ranks(0.0)), count(ranks(1.0))
    if plan.budget > current:
        raise PlanError(f"budget {plan.budget} is above the current size {current}")
    if plan.budget < smallest:
        raise PlanError(f"budget {plan.budget} is below the minimum reachable {smallest} "
                        f"(rank {plan.multiple_of} on every selected matrix)")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # invariant: count(lo) <= budget < count(hi), unless the budget is the current size
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(ranks(mid)) <= plan.budget else (lo, mid)
    chosen, upper = ranks(lo), ranks(hi)
    steps = [_size_after(matrices[p], upper[p]) - _size_after(matrices[p], chosen[p]) for p in selected]
    for i in top_up(selected, [matrices[p] for p in selected], steps, count(chosen), plan.budget):
        chosen[selected[i]] = upper[selected[i]]
    size = count(chosen)
    if abs(size - plan.budget) > 0.01 * plan.budget:
        raise PlanError(f"budget {plan.budget} cannot be met within 1%: the nearest reachable size is {size} "
                        f"(a smaller multiple_of gives finer steps)")
    return chosen


def resolve_plan(params, plan: RankPlan) -> tuple[MatrixPlan, ...]:
    """The plan made concrete: one row per selected matrix, saying what happens to it and why."""
    matrices, skipped = scan_tree(params, dict(plan.views))
    if not matrices:
        why = "; ".join(f"{p}: {r}" for p, r in list(skipped.items())[:3])
        raise PlanError("params hold no matrix (a dict with a 'kernel', 'weight' or factors 'A', 'B')"
                        + (f"; skipped {why}" if why else ""))
    excluded = set(select(list(matrices), plan.exclude, skipped))
    selected = [p for p in select(list(matrices), plan.matrices, skipped) if p not in excluded]
    budget_ranks = _budget_ranks(params, matrices, selected, plan) if plan.budget is not None else {}
    rows, too_wide = [], []
    for path in selected:
        m = matrices[path]
        full = min(m.d_in, m.d_out)
        if plan.rank is not None:
            if plan.rank > full:  # a narrower matrix (GQA's k, v) stays as it is; all of them: an error
                too_wide.append(f"rank {plan.rank} for {path} exceeds min({m.d_in}, {m.d_out})")
                rows.append(MatrixPlan(path, (m.d_in, m.d_out), m.rank, plan.rank, "keep", too_wide[-1]))
                continue
            r = plan.rank
        elif plan.energy is not None:
            r = _rounded(_energy_rank(node_at(params, path), m, plan.energy), full, plan)
        elif plan.budget is not None:
            r = budget_ranks[path]
        else:
            r = _rounded(plan.fraction * full, full, plan)
        break_even = m.d_in * m.d_out / (m.d_in + m.d_out)
        if m.rank is None and r < break_even:
            rows.append(MatrixPlan(path, (m.d_in, m.d_out), None, r, "factorize"))
        elif m.rank is None:
            rows.append(MatrixPlan(path, (m.d_in, m.d_out), None, r, "keep",
                                   f"rank {r} saves no parameters (needs r < {break_even:.1f})"))
        elif r < m.rank:
            rows.append(MatrixPlan(path, (m.d_in, m.d_out), m.rank, r, "reduce"))
        else:
            rows.append(MatrixPlan(path, (m.d_in, m.d_out), m.rank, r, "keep",
                                   f"rank {r} is not below the current rank {m.rank}"))
    if too_wide and len(too_wide) == len(rows):
        raise PlanError(too_wide[0])
    return tuple(rows)


def resolve_ranks(params, plan: RankPlan) -> dict[str, int]:
    """path -> new rank for every matrix the plan changes (kept matrices are left out; see `resolve_plan`)."""
    return {row.path: row.target for row in resolve_plan(params, plan) if row.action != "keep"}


def check_ranks(params, ranks: Mapping[str, int], views: Mapping[str, MatrixView] | None = None
                ) -> dict[str, Matrix]:
    """Raise PlanError unless every path is a matrix and 0 < rank <= min(d_in, d_out) (and <= its current rank)."""
    matrices, skipped = scan_tree(params, views)
    for path, r in ranks.items():
        if path in skipped:
            raise PlanError(f"{path!r} is not a matrix: it {skipped[path]}")
        if path not in matrices:
            raise PlanError(f"{path!r} is not a matrix of these params")
        m = matrices[path]
        if r <= 0:
            raise PlanError(f"rank {r} for {path} must be positive")
        if r > min(m.d_in, m.d_out):
            raise PlanError(f"rank {r} for {path} exceeds min({m.d_in}, {m.d_out})")
        if m.rank is not None and r > m.rank:
            raise PlanError(f"rank {r} for {path} exceeds its current rank {m.rank}")
    return matrices


def predict_param_count(params, ranks: Mapping[str, int], views: Mapping[str, MatrixView] | None = None) -> int:
    """Parameter count of the whole tree after applying `ranks` (path -> rank), without building it."""
    matrices = check_ranks(params, ranks, views)
    return count_params(params) + sum(matrices[p].count * r * (matrices[p].d_in + matrices[p].d_out)
                                      - matrices[p].size for p, r in ranks.items())


def describe_plan(params, plan: RankPlan) -> str:
    """What `plan` does to `params`, one line per node: every selected matrix (shape, slices, current rank →
    target, action and why) and every weight-holding node the views skipped (and why)."""
    matrices, skipped = scan_tree(params, dict(plan.views))
    lines = []
    for row in resolve_plan(params, plan):
        m = matrices[row.path]
        stack = f" × {m.count} slices" if m.count > 1 else ""
        current = "dense" if row.rank is None else f"rank {row.rank}"
        why = f" ({row.reason})" if row.reason else ""
        lines.append(f"{row.action:9s} {row.path}: {row.shape[0]}×{row.shape[1]}{stack}, {current} → "
                     f"rank {row.target}{why}")
    lines += [f"{'skip':9s} {path}: {reason}" for path, reason in skipped.items()]
    return "\n".join(lines)
