"""A single-parent family: schedule → members, each transformed, healed, evaluated and stored.

Progressive (the PLRD recipe): parent → member 1 → heal → member 2 → heal → …, each member made by lowering
the ranks of the *healed* previous member. One-shot (for comparison): every member straight from the parent.

Presets (`PRESETS`, data files in plrd_jax/configs/family/; the PLRD paper does not publish its exact rank
schedule, these are our choices): plrd (the main job), plrd-tpu, minitron, mistral-7b-3.1b, llama2-7b-3.3b.

Resume: the run is a pure function of (parent, schedule, data, seed). Stage k owns the step ids
[start_k, start_k + steps_k] of the family store (see store.py); a rerun restores the newest checkpoint and
continues, ending with bitwise the same members as an uninterrupted run on the same platform.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable

import jax
import numpy as np

from plrd_jax.transforms.calibrate import calibrate
from plrd_jax.nn.config import ModelConfig
from plrd_jax.configs import Presets
from plrd_jax.evaluation.perplexity import perplexities
from plrd_jax.io.store import FamilyStore, StoreError
from plrd_jax.nn.accounting import count_params
from plrd_jax.nn.layout import arrange_layers
from plrd_jax.nn.model import abstract_params
from plrd_jax.nn.sharding import make_mesh, param_shardings, replicated
from plrd_jax.training.loop import run_stage, state_layout
from plrd_jax.training.optim import HealConfig, make_optimizer
from plrd_jax.training.state import init_train_state
from plrd_jax.training.step import make_heal_step
from plrd_jax.transforms.compress import compress
from plrd_jax.transforms.plan import RankPlan


@dataclasses.dataclass(frozen=True)
class Stage:
    """One member: its size (exactly one of a fraction of the parent's parameter count, a uniform rank, or a
    rank fraction) and its healing budget in tokens."""

    name: str
    budget_fraction: float | None = None
    rank: int | None = None
    rank_fraction: float | None = None
    heal_tokens: int = 0

    def __post_init__(self):
        rules = [n for n in ("budget_fraction", "rank", "rank_fraction") if getattr(self, n) is not None]
        if len(rules) != 1:
            raise ValueError(f"stage {self.name!r} needs exactly one of budget_fraction, rank, rank_fraction; "
                             f"got {', '.join(rules) or 'none'}")

    def plan(self, parent_params: int, matrices=("attn", "mlp"), multiple_of: int = 1) -> RankPlan:
        if self.budget_fraction is not None:
            return RankPlan(matrices, budget=int(round(self.budget_fraction * parent_params)),
                            multiple_of=multiple_of)
        if self.rank is not None:
            return RankPlan(matrices, rank=self.rank)
        return RankPlan(matrices, fraction=self.rank_fraction, multiple_of=multiple_of)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A family: its members (`stages`, in order), how each is cut (progressive from the healed previous member
    or one-shot from the parent; method, decomposition, allocation) and healed (batch_size × seq_len windows,
    `heal`, teacher). Presets are files in plrd_jax/configs/family/."""

    stages: tuple[Stage, ...]
    progressive: bool = True
    matrices: tuple[str, ...] = ("attn", "mlp")
    multiple_of: int = 1
    batch_size: int = 4
    seq_len: int = 256
    # How each member's ranks and factors are chosen (plrd_jax.transforms.allocate / decompositions); anything
    # but svd + uniform first calibrates the source model on the first `calibration_windows` healing windows.
    decomposition: str = "svd"
    allocation: str = "uniform"
    calibration_windows: int = 32
    # Who distils into member k when heal.kd_weight > 0: "parent", or "previous" (the healed member k − 1; the
    # parent for member 0).
    teacher: str = "parent"
    # How a member is cut from its source: "plrd" (lower ranks, `compress`) or "minitron" (activation-importance
    # structured pruning to the stage's budget, `plrd_jax.methods.minitron`; members are plain dense models).
    method: str = "plrd"
    minitron_mode: str = "width"
    heal: HealConfig = HealConfig(lr=2e-4, warmup_steps=2, total_steps=2)  # total_steps set per stage

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {self.teacher!r}; expected one of {', '.join(TEACHERS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "minitron" and any(s.budget_fraction is None for s in self.stages):
            raise ValueError("minitron members are sized by parameter budget: give every stage a budget_fraction")

    def steps(self, stage: Stage) -> int:
        return stage.heal_tokens // (self.batch_size * self.seq_len * self.heal.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TEACHERS = ("parent", "previous")
METHODS = ("plrd", "minitron")
# Where each method's members live in a shared family store (Sheared's: plrd_jax.methods.sheared): member numbers from
# MEMBER_BASE[method], step ids from STEP_BASE[method], so methods never overwrite each other.
MEMBER_BASE = {"plrd": 0, "minitron": 200}
STEP_BASE = {"plrd": 0, "minitron": 2_000_000_000}


def _stages(fractions, tokens, prefix="plrd"):
    return tuple(Stage(f"{prefix}-{round(f * 100)}%", budget_fraction=f, heal_tokens=tokens) for f in fractions)


PRESETS = Presets("family", Schedule)  # plrd_jax/configs/family/*.toml


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class MemberResult:
    """One finished member. ppl_before / ppl_after: evaluation corpus -> PPL before / after healing."""

    member: int
    name: str
    params: int
    fraction: float
    ppl_before: dict[str, float]
    ppl_after: dict[str, float]
    tokens: int
    wall_s: float
    ranks: dict[str, int]


def _ranks(config: ModelConfig) -> dict[str, int]:
    return {p: s.rank for p, s in config.linears if s.rank is not None}


def run_family(parent: str, parent_config: ModelConfig, parent_params, schedule: Schedule, heal_data,
               eval_sets, store: FamilyStore, *, calibration_windows: np.ndarray | None = None,
               mesh_shape=(1, -1, 1), save_every: int = 0, eval_batch_size: int = 4, seed: int = 0,
               data_spec: dict | None = None, scan_layers: bool = True,
               on_event: Callable[[str, dict], None] = lambda kind, info: None) -> list[MemberResult]:
    """Build (or finish building) the family in `store`.

    heal_data: a TokenDataset with seq_len schedule.seq_len; eval_sets: {corpus name: windows [N, T]} (every
    member and the parent are scored on each; a bare [N, T] array is the corpus "eval");
    calibration_windows [C, T']: the text the decompositions calibrate on (default: the first
    `schedule.calibration_windows` healing windows). on_event(kind, info) reports progress ("parent", "stage",
    "step", "eval", "member"); the library never prints. Returns one MemberResult per stage; the parent's PPL
    per corpus is in every member's metadata ("parent_ppl").
    scan_layers: the parent and every member whose layers share one shape run their layers under one scan,
    params stored stacked (`nn.layout.arrange_layers`); the others, or all with False, run unrolled. The
    layout changes how a model is computed, not what: it is not part of the run's identity.
    """
    if heal_data.seq_len != schedule.seq_len:
        raise ValueError(f"heal data windows are {heal_data.seq_len} tokens, the schedule wants {schedule.seq_len}")
    if not isinstance(eval_sets, dict):
        eval_sets = {"eval": np.asarray(eval_sets)}
    parent_config, parent_params = arrange_layers(parent_config, parent_params, scan_layers)
    if calibration_windows is None:
        calibration_windows = heal_data.windows[:schedule.calibration_windows]
    parent_count = count_params(parent_params)
    run = _FamilyRun(parent, parent_config, parent_params, parent_count, schedule, heal_data, eval_sets, store,
                     calibration_windows, make_mesh(mesh_shape), save_every, eval_batch_size, seed, data_spec,
                     on_event, scan_layers)
    run.run_id = fingerprint({"parent": parent, "schedule": schedule.to_dict(), "data": data_spec, "seed": seed,
                              "parent_params": parent_count})
    existing = {s: store.metadata(s) for s in store.steps()}
    mine = {s for s, m in existing.items() if m.get("method", "plrd") == schedule.method}  # others live beside
    if any(existing[s].get("run") != run.run_id for s in mine):
        raise StoreError(f"{store.directory} holds checkpoints of another family run (different parent, schedule "
                         "or data); choose a new --out directory")
    run.parent_ppl = next((existing[s]["parent_ppl"] for s in mine if "parent_ppl" in existing[s]), None)
    if run.parent_ppl is None:
        run.parent_ppl = _eval(parent_config, parent_params, eval_sets, eval_batch_size, on_event, "parent", -1)
    on_event("parent", {"ppl": run.parent_ppl, "params": parent_count})
    if schedule.heal.kd_weight > 0:
        run.placed_parent = jax.device_put(parent_params, param_shardings(parent_params, run.mesh))
    results, prev = [], (parent_config, parent_params)
    for index in range(len(schedule.stages)):
        result, prev = run.member(index, prev, mine)
        results.append(result)
    return results


@dataclasses.dataclass
class _FamilyRun:
    """The state shared by the members of one `run_family` call."""

    parent: str
    parent_config: ModelConfig
    parent_params: Any
    parent_count: int
    schedule: Schedule
    heal_data: Any
    eval_sets: dict
    store: FamilyStore
    calibration_windows: np.ndarray
    mesh: Any
    save_every: int
    eval_batch_size: int
    seed: int
    data_spec: dict | None
    on_event: Callable
    scan_layers: bool
    run_id: str = ""
    parent_ppl: dict | None = None
    placed_parent: Any = None
    parent_stats: Any = None  # one-shot members all calibrate on the parent: once is enough

    def steps(self) -> list[int]:
        return [self.schedule.steps(s) for s in self.schedule.stages]

    def member(self, index: int, prev, saved) -> tuple[MemberResult, tuple]:
        """Member `index`: restored if finished, else cut from its source (or resumed) and healed."""
        schedule, store, steps = self.schedule, self.store, self.steps()
        stage, k = schedule.stages[index], MEMBER_BASE[schedule.method] + index  # k: its number in the store
        start = int(STEP_BASE[schedule.method] + sum(n + 1 for n in steps[:index]))
        n_steps = steps[index]
        final = start + n_steps
        if final in saved:  # finished in an earlier run
            meta = store.metadata(final)
            config = ModelConfig.from_dict(meta["config"])
            params, _ = store.restore(final, abstract_params(config))
            result = MemberResult(**meta["result"])
            self.on_event("member", {"result": result, "restored": True, "parent_ppl": self.parent_ppl,
                                     "decomposition_report": meta.get("decomposition_report")})
            return result, (config, params)
        t0 = time.perf_counter()
        resume = max((s for s in saved if start <= s < final), default=None)
        heal = schedule.heal.replace(total_steps=max(n_steps, 1),
                                     warmup_steps=min(schedule.heal.warmup_steps, max(n_steps - 1, 0)))
        self.on_event("stage", {"member": k, "name": stage.name, "steps": n_steps, "resume_step": resume})
        if resume is not None:
            meta = store.metadata(resume)
            config, params = ModelConfig.from_dict(meta["config"]), None
            ppl_before, elapsed = meta["ppl_before"], meta["wall_s"]
            decomposition_report = meta.get("decomposition_report")
            shardings = param_shardings(abstract_params(config), self.mesh)
        else:
            params, config, decomposition_report = self.cut(stage, prev)
            config, params = arrange_layers(config, params, self.scan_layers)
            shardings = param_shardings(params, self.mesh)
            ppl_before = _eval(config, params, self.eval_sets, self.eval_batch_size, self.on_event, "before", k)
            elapsed = 0.0
        count = count_params(abstract_params(config))
        base_meta = {"member": k, "name": stage.name, "method": schedule.method, "run": self.run_id,
                     "parent": self.parent, "schedule": schedule.to_dict(), "data": self.data_spec,
                     "config": config.to_dict(), "params": count, "compression": count / self.parent_count,
                     "ppl_before": ppl_before, "parent_ppl": self.parent_ppl,
                     "decomposition_report": decomposition_report}
        tokens_per_step = schedule.batch_size * schedule.seq_len * heal.grad_accum
        teacher_config, teacher_params = self.teacher(index, prev)

        def batch_at(t):
            batch = self.heal_data.batch_at(sum(steps[:index]) + t, schedule.batch_size * heal.grad_accum, self.seed)
            return batch.reshape(heal.grad_accum, schedule.batch_size, schedule.seq_len)

        def checkpoint_meta(t, run):
            return {**base_meta, "step": start + t, "final": False, "tokens": t * tokens_per_step,
                    "wall_s": elapsed + time.perf_counter() - t0, "heal_s": heal_s0 + run.heal_s,
                    "heal_steps_timed": timed0 + run.timed}

        heal_s0, timed0 = (meta.get("heal_s", 0.0), meta.get("heal_steps_timed", 0)) if resume is not None else (0, 0)
        step_fn = make_heal_step(config, heal, self.mesh, shardings, teacher=teacher_config) if n_steps else None
        run = run_stage(
            step_fn, steps=n_steps, batch_at=batch_at, init=lambda: init_train_state(params, heal, self.mesh, shardings),
            layout=state_layout(abstract_params(config), make_optimizer(heal), self.mesh, shardings), store=store,
            start=start, resume=resume, extra=teacher_params, save_every=self.save_every,
            checkpoint_meta=checkpoint_meta, on_event=self.on_event, info={"member": k, "tokens": tokens_per_step},
            evaluate=lambda state: _eval(config, state.params, self.eval_sets, self.eval_batch_size, self.on_event,
                                         "after", k) if n_steps else ppl_before)
        params, ppl_after = run.state.params, run.evaluation
        result = MemberResult(k, stage.name, count, count / self.parent_count, ppl_before, ppl_after,
                              n_steps * tokens_per_step, elapsed + time.perf_counter() - t0, _ranks(config))
        store.save(final, params, {**base_meta, "step": final, "final": True, "tokens": result.tokens,
                                   "wall_s": result.wall_s, "ppl_after": ppl_after,
                                   "heal_s": heal_s0 + run.heal_s, "heal_steps_timed": timed0 + run.timed,
                                   "result": dataclasses.asdict(result)})
        self.on_event("member", {"result": result, "restored": False, "parent_ppl": self.parent_ppl,
                                 "decomposition_report": decomposition_report})
        return result, (config, params)

    def teacher(self, index: int, prev):
        """(config, placed params) of the model member `index` distils from, or (None, None)."""
        if self.schedule.heal.kd_weight <= 0:
            return None, None
        if self.schedule.teacher == "previous" and index > 0:
            return prev[0], jax.device_put(prev[1], param_shardings(prev[1], self.mesh))
        return self.parent_config, self.placed_parent

    def cut(self, stage: Stage, prev):
        """(params, config, report) of a new member: ranks lowered (plrd) or pruned (minitron) from its source,
        the healed previous member (progressive) or the parent (one-shot)."""
        schedule = self.schedule
        source_config, source_params = prev if schedule.progressive else (self.parent_config, self.parent_params)
        if jax.process_count() > 1:
            # Replicated in one program first: the transforms' op-by-op programs then need no collectives,
            # whose order two processes could otherwise interleave differently (and deadlock).
            source_params = jax.jit(lambda p: p, out_shardings=replicated(self.mesh))(source_params)
        budget = None if stage.budget_fraction is None else int(round(stage.budget_fraction * self.parent_count))
        if schedule.method == "minitron":
            from plrd_jax.methods.minitron import minitron_prune

            return minitron_prune(source_config, source_params, self.calibration_windows, budget,
                                  schedule.minitron_mode)
        plan = dataclasses.replace(stage.plan(self.parent_count, schedule.matrices, schedule.multiple_of),
                                   decomposition=schedule.decomposition)
        stats = None
        if plan.decomposition.needs_stats or schedule.allocation != "uniform":
            stats = self.parent_stats
            if stats is None:
                stats = calibrate(source_config, source_params, self.calibration_windows,
                                  fisher=plan.decomposition.needs_fisher)
                self.parent_stats = None if schedule.progressive else stats
        return compress(source_params, plan, source_config, allocation=schedule.allocation, stats=stats)


def _eval(config, params, eval_sets, batch_size, on_event, when, member) -> dict[str, float]:
    """corpus -> PPL of the model on each evaluation corpus; one "eval" event per corpus."""
    return {name: r.ppl for name, r in perplexities(
        config, params, eval_sets, batch_size,
        report=lambda **info: on_event("eval", {"member": member, "when": when, **info})).items()}
