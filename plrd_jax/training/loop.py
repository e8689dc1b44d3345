"""The one resumable stage loop: restore or init → steps → periodic checkpoints → eval → final checkpoint.

A *stage* is one training run of one model (a PLRD member's healing, a Sheared member's pruning or continued
training, a pretraining run). It owns the step ids [start, start + steps] of a FamilyStore: step id start + t
holds the state after t steps (params and optimizer state), start + steps the finished model. A rerun passes
the newest of those ids as `resume` and continues from there; with the same batches (`batch_at(t)` is a pure
function of t) it ends bitwise where an uninterrupted run ends, on the same platform.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from plrd_jax.training.state import TrainState, new_state, train_state_shardings


@dataclasses.dataclass
class StageRun:
    """What a stage did in this process. heal_s / timed: seconds and count of its steps after the first (the
    first step of a process also compiles); resumed_at: the step it restored (None: started fresh)."""

    state: TrainState
    done: int
    resumed_at: int | None = None
    heal_s: float = 0.0
    timed: int = 0
    evaluation: Any = None


def latest_checkpoint(store, start: int, stop: int) -> int | None:
    """The newest step id s of `store` with start <= s < stop (a stage's unfinished checkpoints), or None."""
    if store is None:
        return None
    return max((s for s in store.steps() if start <= s < stop), default=None)


def state_layout(params_abstract, optimizer: optax.GradientTransformation, mesh: Mesh, params_shardings):
    """The TrainState of `params_abstract` (floating leaves as float32 master weights) as ShapeDtypeStructs
    carrying their shardings: what `run_stage` restores a checkpoint into."""
    master = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params_abstract)
    abstract = jax.eval_shape(lambda p: new_state(p, optimizer), master)
    shardings = train_state_shardings(abstract, params_shardings, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def run_stage(step_fn: Callable, *, steps: int, batch_at: Callable[[int], np.ndarray],
              init: Callable[[], TrainState], layout: TrainState | None = None, store=None, start: int = 0,
              resume: int | None = None, extra=None, save_every: int = 0,
              checkpoint_meta: Callable[[int, StageRun], dict] | None = None,
              after_step: Callable[[int, TrainState, dict], TrainState | None] | None = None,
              evaluate: Callable[[TrainState], Any] | None = None,
              final_meta: Callable[[StageRun], dict] | None = None,
              on_event: Callable[[str, dict], None] = lambda kind, info: None, info: dict | None = None) -> StageRun:
    """Run one stage of `steps` steps of `step_fn(state, tokens, extra) -> (state, metrics)`.

    resume: a step id in [start, start + steps) of `store` to continue from (`latest_checkpoint`), restored
    into `layout` (`state_layout`); otherwise the state is `init()`. Step t (0-based) trains on `batch_at(t)`
    (grad_accum, B, T) and reports a "step" event ({**info, step, steps, seconds, **metrics}); `after_step(t + 1,
    state, {**metrics, seconds})` may return a replacement state (or None) and may raise to stop the run. Every `save_every`
    steps before the last, the params and optimizer state are saved at step id start + t + 1 with
    `checkpoint_meta(t + 1, run)`. At the end `evaluate(state)` fills `run.evaluation`, then with `final_meta`
    the params alone are saved at start + steps.
    """
    info = info or {}
    if resume is not None:
        params, opt_state = store.restore(resume, layout.params, layout.opt_state)
        done = resume - start
        state = TrainState(step=jnp.asarray(done, jnp.int32), params=params, opt_state=opt_state)
    else:
        state, done = init(), 0
    run = StageRun(state, done, resume)
    for t in range(done, steps):
        tokens = batch_at(t)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, tokens, extra)
        metrics = {key: float(v) for key, v in metrics.items()}
        seconds = time.perf_counter() - t0
        if t > done:  # the first step of a process compiles
            run.heal_s, run.timed = run.heal_s + seconds, run.timed + 1
        run.state = state
        on_event("step", {**info, "step": t + 1, "steps": steps, "seconds": seconds, **metrics})
        if after_step is not None:
            state = after_step(t + 1, state, {**metrics, "seconds": seconds}) or state
            run.state = state
        if store is not None and save_every and (t + 1) % save_every == 0 and t + 1 < steps:
            store.save(start + t + 1, state.params, checkpoint_meta(t + 1, run), opt_state=state.opt_state)
    run.state = state
    if evaluate is not None:
        run.evaluation = evaluate(state)
    if store is not None and final_meta is not None:
        store.save(start + steps, state.params, final_meta(run))
    return run


def heal(config, params, heal_config, batch_at: Callable[[int], np.ndarray], *, steps: int | None = None,
         mesh: Mesh | None = None, teacher=None, teacher_params=None,
         on_event: Callable[[str, dict], None] = lambda kind, info: None):
    """Heal `params` of `config` for `steps` (default heal_config.total_steps) steps on `batch_at(t)` (tokens
    (grad_accum, B, T)), distilling from (teacher config, teacher_params) when kd_weight > 0; nothing is
    stored. Returns (healed params, per-step metrics)."""
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.state import init_train_state
    from plrd_jax.training.step import make_heal_step

    mesh = make_mesh() if mesh is None else mesh
    shardings = param_shardings(params, mesh)
    history = []
    run = run_stage(make_heal_step(config, heal_config, mesh, shardings, teacher=teacher),
                    steps=heal_config.total_steps if steps is None else steps, batch_at=batch_at,
                    init=lambda: init_train_state(params, heal_config, mesh, shardings), extra=teacher_params,
                    after_step=lambda t, state, metrics: history.append(metrics), on_event=on_event)
    return run.state.params, history
