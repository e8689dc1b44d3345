"""Sheared-LLaMA: targeted structured pruning with learned hard-concrete masks, then continued training.

Each member is cut straight from the parent:

  1. Pruning, P steps: hard-concrete masks learned against a Lagrangian on the target shape
     (plrd_jax/methods/l0_pruning.py has the loss, the optimizer and the step).
  2. The final masks `masks.deterministic(log α, target)` are folded by `transforms.prune.prune` into a dense
     model of exactly the target shape.
  3. Continued training, C steps, with the healing step of plrd_jax.training.step.
Both phases read batches by dynamic batch loading (plrd_jax/data/dynamic_loading.py): every `update_every` steps of
pruning (`continue_update_every` of continued training) the domain weights follow the per-domain validation
losses (during pruning: of the current model, `masks.deterministic` without a target) against the reference
losses (given, or the parent's own).

Store: members go into a `FamilyStore` next to PLRD members, with metadata method "sheared", member indices
from `MEMBER_BASE` (100, 101, …; PLRD's are 0, 1, …) and step ids from `STEP_BASE`: member k owns
[start_k, start_k + P_k + C_k]; step start_k + t holds the state after t steps (t < P: model, log α and λ with
their optimizer state; P ≤ t: the pruned model), the last is its final checkpoint. A rerun restores the newest
checkpoint of this run and ends with bitwise the same members as an uninterrupted run on the same platform.

Presets (`PRESETS`): "sheared-smollm2", the embedded parent at ≈75% and ≈50% of its matrix parameters (a CPU
budget); "llama2-7b-1.3b" and "llama2-7b-2.7b", the paper's targets, token budgets (0.42B pruning, 50B
continued), batch sizes, sequence length and RedPajama domain setup (TPU scale; each domain's source is given
as NAME=SOURCE on the command line).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import plrd_jax.data.dynamic_loading as dl
import plrd_jax.nn.masks as M
from plrd_jax.configs import Presets
from plrd_jax.evaluation.perplexity import perplexities, perplexity
from plrd_jax.io.store import FamilyStore, StoreError
from plrd_jax.methods.l0_pruning import (L0Config, init_prune_state, make_prune_step, masked_apply_fn,
                                         prune_state_layout)
from plrd_jax.methods.plrd import fingerprint
from plrd_jax.nn.accounting import count_params
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import abstract_params
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.training.loop import run_stage, state_layout
from plrd_jax.training.optim import HealConfig, make_optimizer
from plrd_jax.training.state import init_train_state
from plrd_jax.training.step import make_heal_step
from plrd_jax.transforms.prune import prune

STEP_BASE = 1_000_000_000  # Sheared step ids start here, far above any PLRD stage block
MEMBER_BASE = 100  # Sheared member indices: 100, 101, …

# ---- schedules and presets ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShearMember:
    name: str
    target: M.TargetShape
    prune_tokens: int
    continue_tokens: int

@dataclasses.dataclass(frozen=True)
class ShearSchedule:
    """Members and the settings both phases share. A pruning step sees batch_size × seq_len × prune.grad_accum
    tokens, a continued-training step continue_batch_size (default batch_size) × seq_len × heal.grad_accum."""

    members: tuple[ShearMember, ...]
    domains: dl.Domains  # update_every applies while pruning
    batch_size: int = 4
    seq_len: int = 256
    continue_batch_size: int | None = None
    prune: HealConfig = HealConfig(lr=1e-4, warmup_steps=0, total_steps=1)  # steps set per member
    heal: HealConfig = HealConfig(lr=1e-4, warmup_steps=0, total_steps=1)
    prune_warmup_fraction: float = 0.1
    continue_warmup_fraction: float = 0.03
    l0: L0Config = L0Config()
    continue_update_every: int = 400
    validation_windows: int = 4  # per domain, held out from its training windows

    def prune_steps(self, member: ShearMember) -> int:
        return member.prune_tokens // (self.batch_size * self.seq_len * self.prune.grad_accum)

    def continue_steps(self, member: ShearMember) -> int:
        batch = self.continue_batch_size or self.batch_size
        return member.continue_tokens // (batch * self.seq_len * self.heal.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

def _phase(base: HealConfig, steps: int, warmup_fraction: float) -> HealConfig:
    n = max(steps, 1)
    return base.replace(total_steps=n, warmup_steps=min(n, int(round(warmup_fraction * n))))

PRESETS = Presets("sheared", ShearSchedule)  # plrd_jax/configs/sheared/*.toml

# ---- the run: members into the family store -----------------------------------------------------------
@dataclasses.dataclass
class ShearResult:
    member: int
    name: str
    params: int
    fraction: float
    ppl_before: dict[str, float]  # corpus -> PPL of the pruned model before continued training
    ppl_after: dict[str, float]
    tokens: int  # pruning + continued-training tokens
    wall_s: float
    shape: dict[str, int]
    prune_tokens: int
    continue_tokens: int
    domain_weights: list  # [[step, [w...]], ...] over both phases

def domain_losses(model, params, validation: Sequence[np.ndarray], batch_size: int = 4) -> list[float]:
    """Mean next-token NLL of each domain's validation windows (model: a ModelConfig or an apply function)."""
    return [perplexity(model, params, w, batch_size=batch_size).nll for w in validation]

def check_run(parent_config: ModelConfig, schedule: ShearSchedule, domain_windows: Mapping[str, np.ndarray]
              ) -> list[M.TargetShape]:
    """Every target resolved against the parent, every domain present with enough windows of seq_len
    (raises before any compute)."""
    targets = [m.target.resolve(parent_config) for m in schedule.members]
    names = [m.name for m in schedule.members]
    if len(set(names)) != len(names):
        raise ValueError(f"member names must be distinct, got {names}")
    missing = [n for n in schedule.domains.names if n not in domain_windows]
    if missing:
        raise dl.DomainError(f"no data for domain(s) {', '.join(missing)}; have {', '.join(domain_windows)}")
    for name in schedule.domains.names:
        w = np.asarray(domain_windows[name])
        if w.ndim != 2 or w.shape[1] != schedule.seq_len:
            raise dl.DomainError(f"domain {name} windows have shape {w.shape}; the schedule wants [N, "
                                 f"{schedule.seq_len}]")
        dl.split_validation(w, schedule.validation_windows, name)
    if schedule.seq_len > parent_config.max_seq_len:
        raise ValueError(f"seq_len {schedule.seq_len} exceeds the parent's context {parent_config.max_seq_len}")
    return targets

def run_shear(parent: str, parent_config: ModelConfig, parent_params, schedule: ShearSchedule,
              domain_windows: Mapping[str, np.ndarray], eval_windows, store: FamilyStore, *,
              mesh_shape=(1, -1, 1), save_every: int = 0, eval_batch_size: int = 4, seed: int = 0,
              data_spec: dict | None = None,
              on_event: Callable[[str, dict], None] = lambda kind, info: None) -> list[ShearResult]:
    """Build (or finish building) the Sheared members of `schedule` in `store`.

    domain_windows: name -> packed windows [N, seq_len] (the last `validation_windows` of each are held out for
    its validation loss); eval_windows: {corpus: windows [N, T]} (or one [N, T] array, the corpus "eval"): the
    text every member's PPL is reported on, disjoint from all of them. on_event(kind, info): "stage", "step", "weights", "eval", "member" (the library never prints).
    """
    targets = check_run(parent_config, schedule, domain_windows)
    if not isinstance(eval_windows, dict):
        eval_windows = {"eval": np.asarray(eval_windows)}
    names = schedule.domains.names
    split = [dl.split_validation(np.asarray(domain_windows[n]), schedule.validation_windows, n) for n in names]
    train_windows, validation = [s[0] for s in split], [s[1] for s in split]
    parent_count = count_params(parent_params)
    run_id = fingerprint({"method": "sheared", "parent": parent, "schedule": schedule.to_dict(), "data": data_spec,
                          "seed": seed, "parent_params": parent_count})
    existing = {s: store.metadata(s) for s in store.steps()}
    saved = {s for s, m in existing.items() if m.get("method") == "sheared"}
    if any(existing[s].get("run") != run_id for s in saved):
        raise StoreError(f"{store.directory} holds checkpoints of another Sheared run (different parent, schedule "
                         "or data); choose a new --out directory")
    mesh = make_mesh(mesh_shape)

    references = schedule.domains.reference_losses
    if references is None:  # the parent's own losses, measured once and kept in every checkpoint's metadata
        earlier = [existing[s]["reference_losses"] for s in sorted(saved)]
        references = tuple(earlier[0]) if earlier else tuple(
            domain_losses(parent_config, parent_params, validation, eval_batch_size))
    on_event("references", {"names": list(names), "losses": list(references)})

    prune_steps = [schedule.prune_steps(m) for m in schedule.members]
    continue_steps = [schedule.continue_steps(m) for m in schedule.members]
    starts = (STEP_BASE + np.cumsum([0] + [p + c + 1 for p, c in zip(prune_steps, continue_steps)])[:-1]).tolist()
    run = _ShearRun(parent, parent_config, parent_params, parent_count, schedule, train_windows, validation,
                    references, eval_windows, store, mesh, run_id, save_every, eval_batch_size, seed, data_spec,
                    on_event)
    results = []
    for k, (member, target) in enumerate(zip(schedule.members, targets)):
        P, C, start = prune_steps[k], continue_steps[k], starts[k]
        final = start + P + C
        if final in saved:
            meta = existing[final]
            results.append(ShearResult(**meta["result"]))
            on_event("member", {"result": results[-1], "restored": True})
            continue
        results.append(_run_member(k, member, target, P, C, start,
                                   max((s for s in saved if start <= s < final), default=None), run))
    return results

@dataclasses.dataclass
class _ShearRun:
    """What the members of one `run_shear` call share."""

    parent: str
    parent_config: ModelConfig
    parent_params: Any
    parent_count: int
    schedule: ShearSchedule
    train_windows: list
    validation: list
    references: tuple
    eval_windows: dict
    store: FamilyStore
    mesh: Any
    run_id: str
    save_every: int
    eval_batch_size: int
    seed: int
    data_spec: dict | None
    on_event: Callable

def _run_member(k, member, target, P, C, start, resume, run: _ShearRun) -> ShearResult:
    """Member k: the pruning phase (steps start … start + P), the pruned model saved at start + P, continued
    training (… start + P + C), each resumable from the newest checkpoint `resume`."""
    t0 = time.perf_counter()
    schedule, index = run.schedule, MEMBER_BASE + k
    base_meta = {"member": index, "name": member.name, "method": "sheared", "run": run.run_id,
                 "parent": run.parent, "schedule": schedule.to_dict(), "data": run.data_spec,
                 "target": target.to_dict(), "reference_losses": list(run.references)}
    meta = run.store.metadata(resume) if resume is not None else None
    elapsed = meta["wall_s"] if meta else 0.0

    def event(kind, **info):
        run.on_event(kind, {"member": index, "name": member.name, **info})

    def wall():
        return elapsed + time.perf_counter() - t0

    if meta is None or meta["phase"] == "prune":
        config, params, loader, ppl_before = _prune_phase(member, target, P, start, resume, meta, base_meta, run,
                                                          event, wall)
        resume = None
    else:
        config, params = ModelConfig.from_dict(meta["config"]), None
        loader, ppl_before = dl.LoaderState.from_dict(meta["loader"]), meta["ppl_before"]
        if resume == start + P:  # only the pruned model: continued training starts fresh from it
            params, _ = run.store.restore(resume, abstract_params(config))
            resume = None
    return _continue_phase(index, member, config, params, loader, ppl_before, P, C, start, resume, base_meta, run,
                           event, wall)

def _update_weights(loader, model, params, t, run: _ShearRun, event):
    """Dynamic batch loading: new domain weights from the per-domain validation losses of `model`."""
    losses = domain_losses(model, params, run.validation, run.eval_batch_size)
    loader = dl.update(loader, run.schedule.domains, losses, t, run.references)
    event("weights", step=t, losses=losses, weights=list(loader.weights), names=list(run.schedule.domains.names))
    return loader

def _prune_phase(member, target, P, start, resume, meta, base_meta, run: _ShearRun, event, wall):
    """Learn the masks for P steps, fold them into a dense pruned model, evaluate it and save it at start + P
    (so that a resume never prunes again). Returns (config, params, loader, ppl_before)."""
    schedule, mesh, T = run.schedule, run.mesh, run.schedule.seq_len
    heal = _phase(schedule.prune, P, schedule.prune_warmup_fraction)
    batch = schedule.batch_size
    shardings = param_shardings(run.parent_params, mesh)
    loader = dl.init_state(schedule.domains, 0) if meta is None else dl.LoaderState.from_dict(meta["loader"])

    def batch_at(t):
        nonlocal loader
        tokens, _, loader = dl.sample_batch(loader, run.train_windows, batch * heal.grad_accum, start + t, run.seed)
        return tokens.reshape(heal.grad_accum, batch, T)

    def after_step(t, state, metrics):
        nonlocal loader
        if t % schedule.domains.update_every == 0 and t < P:
            current = M.deterministic(state.params["log_alpha"], run.parent_config,
                                      temperature=schedule.l0.temperature)
            loader = _update_weights(loader, masked_apply_fn(run.parent_config),
                                     {"model": state.params["model"], "masks": current}, t, run, event)

    event("stage", phase="prune", steps=P, resume_step=None if meta is None else resume - start)
    stage = run_stage(
        make_prune_step(run.parent_config, target, heal, schedule.l0, mesh, shardings, P, run.seed), steps=P,
        batch_at=batch_at, init=lambda: init_prune_state(run.parent_params, run.parent_config, heal, schedule.l0,
                                                         mesh, shardings, run.seed),
        layout=prune_state_layout(run.parent_config, heal, schedule.l0, mesh, shardings), store=run.store,
        start=start, resume=resume, save_every=run.save_every, after_step=after_step, on_event=lambda kind, info: event(kind, **info),
        info={"phase": "prune", "tokens": batch * T * heal.grad_accum},
        checkpoint_meta=lambda t, _: {**base_meta, "phase": "prune", "step": start + t, "final": False,
                                      "loader": loader.to_dict(), "wall_s": wall()})
    state = stage.state
    final_masks = M.deterministic(state.params["log_alpha"], run.parent_config, target, schedule.l0.temperature)
    params, config = prune(state.params["model"], run.parent_config, final_masks)
    del state, stage
    ppl_before = _eval(config, params, run.eval_windows, run.eval_batch_size, event, "pruned")
    if schedule.continue_steps(member):
        run.store.save(start + P, params, {**base_meta, "phase": "continue", "step": start + P, "final": False,
                                           "config": config.to_dict(), "loader": loader.to_dict(),
                                           "ppl_before": ppl_before, "wall_s": wall()})
    return config, params, loader, ppl_before

def _continue_phase(index, member, config, params, loader, ppl_before, P, C, start, resume, base_meta,
                    run: _ShearRun, event, wall) -> ShearResult:
    """Continued training of the pruned model for C steps (resumable), then its evaluation and final save."""
    schedule, mesh, T = run.schedule, run.mesh, run.schedule.seq_len
    heal = _phase(schedule.heal, C, schedule.continue_warmup_fraction)
    prune_heal = _phase(schedule.prune, P, schedule.prune_warmup_fraction)
    batch = schedule.continue_batch_size or schedule.batch_size
    shardings = param_shardings(abstract_params(config), mesh)
    cont_meta = {**base_meta, "config": config.to_dict(), "ppl_before": ppl_before}

    def batch_at(t):
        nonlocal loader
        tokens, _, loader = dl.sample_batch(loader, run.train_windows, batch * heal.grad_accum, start + P + t,
                                            run.seed)
        return tokens.reshape(heal.grad_accum, batch, T)

    def after_step(t, state, metrics):
        nonlocal loader
        if t % schedule.continue_update_every == 0 and t < C:
            loader = _update_weights(loader, config, state.params, P + t, run, event)

    if C:
        event("stage", phase="continue", steps=C, resume_step=None if resume is None else resume - start - P)
    stage = run_stage(
        make_heal_step(config, heal, mesh, shardings) if C else None, steps=C, batch_at=batch_at,
        init=lambda: init_train_state(params, heal, mesh, shardings),
        layout=state_layout(abstract_params(config), make_optimizer(heal), mesh, shardings), store=run.store,
        start=start + P, resume=resume, save_every=run.save_every, after_step=after_step, on_event=lambda kind, info: event(kind, **info),
        info={"phase": "continue", "tokens": batch * T * heal.grad_accum},
        checkpoint_meta=lambda t, _: {**cont_meta, "phase": "continue", "step": start + P + t, "final": False,
                                      "loader": loader.to_dict(), "wall_s": wall()},
        evaluate=lambda state: _eval(config, state.params, run.eval_windows, run.eval_batch_size, event, "after")
        if C else ppl_before)
    params, ppl_after = stage.state.params, stage.evaluation
    count = count_params(params)
    shape = {key: getattr(config, key) for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                   "intermediate_size")}
    prune_tokens = P * schedule.batch_size * T * prune_heal.grad_accum
    continue_tokens = C * batch * T * heal.grad_accum
    result = ShearResult(index, member.name, count, count / run.parent_count, ppl_before, ppl_after,
                         prune_tokens + continue_tokens, wall(), shape, prune_tokens, continue_tokens,
                         [[s, list(w)] for s, w in loader.history])
    run.store.save(start + P + C, params, {**cont_meta, "phase": "final", "step": start + P + C, "final": True,
                                           "params": count, "compression": count / run.parent_count,
                                           "tokens": result.tokens, "wall_s": result.wall_s, "ppl_after": ppl_after,
                                           "loader": loader.to_dict(), "result": dataclasses.asdict(result)})
    run.on_event("member", {"result": result, "restored": False})
    return result

def _eval(config, params, eval_sets, batch_size, event, when) -> dict[str, float]:
    return {name: r.ppl for name, r in perplexities(
        config, params, eval_sets, batch_size, report=lambda **info: event("eval", when=when, **info)).items()}
