"""Sheared-LLaMA: targeted structured pruning with learned hard-concrete masks, then continued training.

Each member is cut straight from the parent:

  1. Pruning, P steps. With masks z sampled once per step from log α (plrd_jax/masks.py) and applied in the
     decoder, the loss is
         CE(model, z) + Σ_m mean_rows[ λ1_m (ŝ_m − t_m) + λ2_m (ŝ_m − t_m)² ]
     over the mask types m ∈ {layer, head, int, hidden}: ŝ_m the expected sparsity 1 − mean P(z > 0) of each
     row (one per layer for heads and intermediate dims), t_m the target's sparsity, ramped linearly from 0 over
     the first `ramp_fraction` of the steps. For a GQA parent one more term, "kv_groups", does the same for
     how full the kv groups are (`masks.group_fill`: min(1, expected heads / target heads per group)), so
     that the heads kept come in whole groups of the target's size. `optax.multi_transform` trains three groups on one warmup + cosine
     shape: the model with the healing optimizer (AdamW lr 1e-4, clip 1.0), log α with Adam (lr 1.0) and the
     multipliers λ with Adam at lr −1.0, i.e. gradient *ascent*. log α is clamped to [log 0.01, log 100] after
     every step. Clipping covers the model's gradient only (Adam is scale-free for log α and λ anyway).
  2. The final masks `masks.deterministic(log α, target)` are folded by `transforms.prune.prune` into a dense
     model of exactly the target shape.
  3. Continued training, C steps, with the healing step of plrd_jax.training.step.
Both phases read batches by dynamic batch loading (plrd_jax/dynamic_loading.py): every `update_every` steps of
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
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import plrd_jax.data.dynamic_loading as dl
import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig
from plrd_jax.evaluation.perplexity import perplexity
from plrd_jax.methods.plrd import fingerprint
from plrd_jax.nn.model import Decoder, count_params
from plrd_jax.nn.sharding import RULES, batch_sharding, make_mesh, param_shardings, replicated, shard_activations
from plrd_jax.io.store import FamilyStore, StoreError, abstract_params
from plrd_jax.training.step import (HealConfig, TrainState, init_train_state, learning_rate_schedule, make_heal_step,
                            make_optimizer, next_token_loss, train_state_shardings, trainable)
from plrd_jax.transforms.prune import prune

LAGRANGIAN_TERMS = M.MASK_NAMES + ("kv_groups",)  # one (λ1, λ2) each; kv_groups stays unused for MHA
STEP_BASE = 1_000_000_000  # Sheared step ids start here, far above any PLRD stage block
MEMBER_BASE = 100  # Sheared member indices: 100, 101, …


# ---- the pruning phase: Lagrangian, optimizer, step ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class L0Config:
    """The mask side of the pruning phase (the model side is a HealConfig)."""

    log_alpha_lr: float = 1.0
    lambda_lr: float = 1.0  # applied as gradient ascent (an optax learning rate of −lambda_lr)
    ramp_fraction: float = 0.2  # target sparsity ramps 0 → t over this fraction of the pruning steps
    temperature: float = M.TEMPERATURE
    log_alpha_init: float = 5.0
    log_alpha_init_std: float = 0.01

    def __post_init__(self):
        if self.log_alpha_lr <= 0 or self.lambda_lr <= 0:
            raise ValueError(f"log_alpha_lr {self.log_alpha_lr} and lambda_lr {self.lambda_lr} must be positive")
        if not 0 <= self.ramp_fraction <= 1:
            raise ValueError(f"ramp_fraction {self.ramp_fraction} must lie in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be positive")


def ramped_targets(final: Mapping[str, float], step, ramp_steps: int) -> dict[str, jax.Array]:
    """t_m · min(1, step / ramp_steps) for each mask type (the full target at once when ramp_steps is 0)."""
    frac = jnp.minimum(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
    return {name: jnp.asarray(t * frac, jnp.float32) for name, t in final.items()}


def lagrangian(log_alpha: M.Masks, lambdas: dict[str, jax.Array], targets: Mapping[str, jax.Array],
               temperature: float = M.TEMPERATURE, groups: tuple[int, int] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_m mean_rows[λ1_m (ŝ_m − t_m) + λ2_m (ŝ_m − t_m)²] over the terms in `targets`, λ_m = lambdas[m] =
    (λ1, λ2); also returns ŝ_m (mean over rows). Term "kv_groups" (GQA; groups = (parent's kv heads, target's
    query heads per group)): ŝ = 1 − mean of `masks.group_fill` per layer."""
    probs = M.prob_nonzero(log_alpha, temperature)
    sparsity = M.expected_sparsity(probs)
    if "kv_groups" in targets:
        sparsity["kv_groups"] = 1.0 - jnp.mean(M.group_fill(probs["z_head"], *groups), axis=-1)
    total = jnp.zeros((), jnp.float32)
    for name, t in targets.items():
        gap = sparsity[name] - t
        total = total + jnp.mean(lambdas[name][0] * gap + lambdas[name][1] * gap ** 2)
    return total, {name: jnp.mean(sparsity[name]) for name in targets}


def lagrangian_targets(target: M.TargetShape, config: ModelConfig) -> dict[str, float]:
    """Final target sparsity of each Lagrangian term: every mask type, and "kv_groups" for a GQA parent."""
    out = M.target_sparsity(target, config)
    if config.num_kv_heads != config.num_heads:
        out["kv_groups"] = 1.0 - target.num_kv_heads / config.num_kv_heads
    return out


def make_prune_optimizer(heal_config: HealConfig, l0: L0Config) -> optax.GradientTransformation:
    """multi_transform: "model" the healing optimizer, "log_alpha" Adam(l0.log_alpha_lr), "lambdas"
    Adam(−l0.lambda_lr) (ascent); each on the healing run's warmup + cosine shape."""
    h = heal_config

    def adam(lr):
        return optax.adam(learning_rate_schedule(h.replace(lr=lr)), h.b1, h.b2, h.eps)
    return optax.multi_transform(
        {"model": make_optimizer(h), "log_alpha": adam(l0.log_alpha_lr), "lambdas": adam(-l0.lambda_lr)},
        {"model": "model", "log_alpha": "log_alpha", "lambdas": "lambdas"})


def init_prune_params(params, config: ModelConfig, l0: L0Config, seed: int = 0) -> dict:
    """{"model": params, "log_alpha": N(init, std²) per mask, "lambdas": zeros (λ1, λ2) per mask type}."""
    log_alpha = M.init_log_alpha(jax.random.key(seed), config, l0.log_alpha_init, l0.log_alpha_init_std)
    return {"model": params, "log_alpha": log_alpha,
            "lambdas": {name: jnp.zeros((2,), jnp.float32) for name in LAGRANGIAN_TERMS}}


def prune_shardings(model_shardings, mesh: Mesh) -> dict:
    """Shardings of the pruning params: the model's, and log α and λ replicated."""
    rep = replicated(mesh)
    return {"model": model_shardings, "log_alpha": {name: rep for name in M.MASK_NAMES},
            "lambdas": {name: rep for name in LAGRANGIAN_TERMS}}


def init_prune_state(params, config: ModelConfig, heal_config: HealConfig, l0: L0Config, mesh: Mesh,
                     model_shardings=None, seed: int = 0, rules=RULES) -> TrainState:
    """A fresh pruning TrainState (step 0) whose params are `init_prune_params`, on their shardings."""
    optimizer = make_prune_optimizer(heal_config, l0)
    if model_shardings is None:
        model_shardings = param_shardings(params, mesh, rules)
    _, state_shardings = prune_state_layout(config, heal_config, l0, mesh, model_shardings)
    full = jax.device_put(init_prune_params(params, config, l0, seed), prune_shardings(model_shardings, mesh))
    return jax.jit(lambda p: _new_state(p, optimizer), out_shardings=state_shardings)(full)


def _trainable(full):
    return {**full, "model": trainable(full["model"])}


def _frozen(params):
    return jax.tree.map(lambda x: None if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _merge(first, second):
    """Leaf of `first`, or of `second` where `first` holds None."""
    return jax.tree.map(lambda a, b: b if a is None else a, first, second, is_leaf=lambda x: x is None)


def _new_state(params, optimizer) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(_trainable(params)))


def prune_state_layout(config: ModelConfig, heal_config: HealConfig, l0: L0Config, mesh: Mesh, model_shardings):
    """(abstract pruning TrainState, its shardings) for `config`'s params on `model_shardings`."""
    optimizer = make_prune_optimizer(heal_config, l0)
    abstract_model = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(config))
    abstract_full = jax.eval_shape(lambda p: init_prune_params(p, config, l0), abstract_model)
    abstract_state = jax.eval_shape(lambda p: _new_state(p, optimizer), abstract_full)
    return abstract_state, train_state_shardings(abstract_state, prune_shardings(model_shardings, mesh), mesh)


def make_prune_step(config: ModelConfig, target: M.TargetShape, heal_config: HealConfig, l0: L0Config,
                    mesh: Mesh, model_shardings, total_steps: int, seed: int = 0, rules=RULES) -> Callable:
    """The jitted step `step(state, tokens) -> (state, metrics)` of the pruning phase.

    tokens (grad_accum, B, T). One mask sample per step (key: fold_in(key(seed), step)), shared by every
    micro-batch; its gradient reaches log α through the reparameterized sample. metrics (float32 scalars):
    loss, ce, lagrangian, grad_norm (model, before clipping), lr (model), expected_size, target_size and per
    mask type `sparsity/<m>`, `target/<m>`, `lambda1/<m>`, `lambda2/<m>`. The input state is donated.
    """
    h = heal_config
    target = target.resolve(config)
    final_targets = lagrangian_targets(target, config)
    ramp_steps = int(round(l0.ramp_fraction * total_steps))
    target_size = float(M.matrix_size(target.config(config)))
    model = Decoder(config.replace(dtype=h.dtype))
    optimizer, schedule = make_prune_optimizer(h, l0), learning_rate_schedule(h)
    base_key = jax.random.key(seed)

    _, state_shardings = prune_state_layout(config, h, l0, mesh, model_shardings)
    micro_sharding = batch_sharding(mesh, rules=rules)

    def micro_loss(train_model, frozen, masks, tokens):
        with shard_activations(mesh, rules):
            logits = model.apply({"params": _merge(train_model, frozen)}, tokens, masks=masks)
        return next_token_loss(logits, tokens)

    grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 2))

    def constrain(grads):
        return jax.tree.map(lambda g, s: None if g is None else jax.lax.with_sharding_constraint(g, s),
                            grads, model_shardings, is_leaf=lambda x: x is None)

    def step(state: TrainState, tokens: jax.Array):
        if tokens.ndim != 3 or tokens.shape[0] != h.grad_accum:
            raise ValueError(f"tokens of shape {tokens.shape}: expected (grad_accum={h.grad_accum}, B, T)")
        p = state.params
        train_model, frozen = trainable(p["model"]), _frozen(p["model"])
        key = jax.random.fold_in(base_key, state.step)
        masks, masks_vjp = jax.vjp(lambda a: M.sample(a, key, l0.temperature), p["log_alpha"])

        def accumulate(carry, micro_tokens):
            g_model, g_masks, ce_sum = carry
            micro_tokens = jax.lax.with_sharding_constraint(micro_tokens, micro_sharding)
            ce, (gm, gz) = grad_fn(train_model, frozen, masks, micro_tokens)
            g_model = constrain(jax.tree.map(jnp.add, g_model, gm))
            return (g_model, jax.tree.map(jnp.add, g_masks, gz), ce_sum + ce), None

        zeros = (constrain(jax.tree.map(jnp.zeros_like, train_model)), jax.tree.map(jnp.zeros_like, masks),
                 jnp.zeros((), jnp.float32))
        (g_model, g_masks, ce_sum), _ = jax.lax.scan(accumulate, zeros, tokens)
        g_model = jax.tree.map(lambda g: g / h.grad_accum, g_model)
        (g_alpha_ce,) = masks_vjp(jax.tree.map(lambda g: g / h.grad_accum, g_masks))
        targets = ramped_targets(final_targets, state.step, ramp_steps)
        (lag, sparsity), (g_alpha_lag, g_lambdas) = jax.value_and_grad(lagrangian, argnums=(0, 1), has_aux=True)(
            p["log_alpha"], p["lambdas"], targets, l0.temperature,
            (config.num_kv_heads, target.num_heads // target.num_kv_heads))
        grads = {"model": g_model, "log_alpha": jax.tree.map(jnp.add, g_alpha_ce, g_alpha_lag),
                 "lambdas": g_lambdas}
        train = _trainable(p)
        updates, opt_state = optimizer.update(grads, state.opt_state, train)
        new = optax.apply_updates(train, updates)
        new = {"model": _merge(new["model"], frozen), "log_alpha": M.clamp_log_alpha(new["log_alpha"]),
               "lambdas": new["lambdas"]}
        ce = ce_sum / h.grad_accum
        metrics = {"loss": ce + lag, "ce": ce, "lagrangian": lag, "grad_norm": optax.tree.norm(g_model),
                   "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "expected_size": M.expected_size(M.prob_nonzero(p["log_alpha"], l0.temperature), config),
                   "target_size": jnp.asarray(target_size, jnp.float32)}
        for name in targets:
            metrics.update({f"sparsity/{name}": sparsity[name], f"target/{name}": targets[name],
                            f"lambda1/{name}": p["lambdas"][name][0], f"lambda2/{name}": p["lambdas"][name][1]})
        return state.replace(step=state.step + 1, params=new, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh, 1, rules)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


@functools.lru_cache(maxsize=16)
def masked_apply_fn(config: ModelConfig):
    """(params {"model", "masks"}, tokens) -> logits of `config` run with the masks (for `perplexity`)."""

    def apply(params, tokens):
        return Decoder(config).apply({"params": params["model"]}, tokens, masks=params["masks"])
    return apply


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


# The family's healing mixture (tiny-shakespeare and pydoc stay unseen, for evaluation).
LOCAL = dl.Domains(("wikitext", "books", "speeches"), (1 / 3, 1 / 3, 1 / 3), update_every=5)
REDPAJAMA = ("cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4")
REDPAJAMA_WEIGHTS = (0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15)
# Per-domain reference losses from the paper's scaling-law fits (LLM-Shearing scripts/pruning.sh).
REFERENCE_1_3B = (1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251)
REFERENCE_2_7B = (1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328)


def _llama2_7b(name: str, target: M.TargetShape, reference: tuple[float, ...]) -> ShearSchedule:
    """The paper: 3,200 pruning steps × 32 × 4096 (0.42B tokens), 48,000 continued steps × 256 × 4096 (50B)."""
    return ShearSchedule(
        (ShearMember(name, target, prune_tokens=3200 * 32 * 4096, continue_tokens=48000 * 256 * 4096),),
        dl.Domains(REDPAJAMA, REDPAJAMA_WEIGHTS, reference, update_every=50),
        batch_size=32, continue_batch_size=256, seq_len=4096,
        prune=HealConfig(lr=1e-4, warmup_steps=0, total_steps=1, dtype="bfloat16"),
        heal=HealConfig(lr=1e-4, warmup_steps=0, total_steps=1, dtype="bfloat16"),
        continue_update_every=400, validation_windows=500)


PRESETS: dict[str, ShearSchedule] = {
    # embedded parent (30 layers, d 576, 9 heads / 3 kv, 1536): ≈75% and ≈50% of its 106M matrix params
    "sheared-smollm2": ShearSchedule(
        (ShearMember("sheared-75%", M.TargetShape(28, 528, 6, 1408, 3), 6 * 1024, 10 * 1024),
         ShearMember("sheared-50%", M.TargetShape(22, 480, 6, 1344, 2), 6 * 1024, 10 * 1024)),
        LOCAL, batch_size=4, seq_len=128, prune=HealConfig(lr=2e-4, warmup_steps=0, total_steps=1),
        heal=HealConfig(lr=2e-4, warmup_steps=0, total_steps=1), continue_warmup_fraction=0.1,
        continue_update_every=5, validation_windows=4),
    "llama2-7b-1.3b": _llama2_7b("sheared-1.3b", M.TargetShape(24, 2048, 16, 5504), REFERENCE_1_3B),
    "llama2-7b-2.7b": _llama2_7b("sheared-2.7b", M.TargetShape(32, 2560, 20, 6912), REFERENCE_2_7B),
}


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
    results = []
    for k, (member, target) in enumerate(zip(schedule.members, targets)):
        P, C, start = prune_steps[k], continue_steps[k], starts[k]
        final = start + P + C
        if final in saved:
            meta = existing[final]
            results.append(ShearResult(**meta["result"]))
            on_event("member", {"result": results[-1], "restored": True})
            continue
        results.append(_run_member(k, member, target, P, C, start, max((s for s in saved if start <= s < final),
                                                                        default=None),
                                   parent, parent_config, parent_params, schedule, train_windows, validation,
                                   references, eval_windows, store, mesh, run_id, parent_count, save_every,
                                   eval_batch_size, seed, data_spec, on_event))
    return results


def _run_member(k, member, target, P, C, start, resume, parent, parent_config, parent_params, schedule,
                train_windows, validation, references, eval_windows, store, mesh, run_id, parent_count,
                save_every, eval_batch_size, seed, data_spec, on_event) -> ShearResult:
    t0 = time.perf_counter()
    index, names = MEMBER_BASE + k, list(schedule.domains.names)
    prune_heal = _phase(schedule.prune, P, schedule.prune_warmup_fraction)
    heal = _phase(schedule.heal, C, schedule.continue_warmup_fraction)
    prune_batch, batch = schedule.batch_size, schedule.continue_batch_size or schedule.batch_size
    T = schedule.seq_len
    base_meta = {"member": index, "name": member.name, "method": "sheared", "run": run_id, "parent": parent,
                 "schedule": schedule.to_dict(), "data": data_spec, "target": target.to_dict(),
                 "reference_losses": list(references)}
    meta = store.metadata(resume) if resume is not None else None
    elapsed = meta["wall_s"] if meta else 0.0

    def event(kind, **info):
        on_event(kind, {"member": index, "name": member.name, **info})

    def update_weights(loader, model, params, t):
        losses = domain_losses(model, params, validation, eval_batch_size)
        loader = dl.update(loader, schedule.domains, losses, t, references)
        event("weights", step=t, losses=losses, weights=list(loader.weights), names=names)
        return loader

    # ---- pruning phase ----
    if meta is None or meta["phase"] == "prune":
        shardings = param_shardings(parent_params, mesh)
        if meta is None:
            loader = dl.init_state(schedule.domains, 0)
            state = init_prune_state(parent_params, parent_config, prune_heal, schedule.l0, mesh, shardings, seed)
            t_done = 0
        else:
            loader = dl.LoaderState.from_dict(meta["loader"])
            layout, layout_shardings = prune_state_layout(parent_config, prune_heal, schedule.l0, mesh, shardings)
            with_shardings = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), layout,
                                          layout_shardings)
            params, opt_state = store.restore(resume, with_shardings.params, with_shardings.opt_state)
            t_done = resume - start
            state = TrainState(step=jnp.asarray(t_done, jnp.int32), params=params, opt_state=opt_state)
        event("stage", phase="prune", steps=P, resume_step=t_done if meta else None)
        step_fn = make_prune_step(parent_config, target, prune_heal, schedule.l0, mesh, shardings, P, seed)
        tokens_per_step = prune_batch * T * prune_heal.grad_accum
        for t in range(t_done, P):
            tokens, _, loader = dl.sample_batch(loader, train_windows, prune_batch * prune_heal.grad_accum,
                                                start + t, seed)
            ts = time.perf_counter()
            state, metrics = step_fn(state, tokens.reshape(prune_heal.grad_accum, prune_batch, T))
            metrics = {key: float(v) for key, v in metrics.items()}
            event("step", phase="prune", step=t + 1, steps=P, tokens=tokens_per_step,
                  seconds=time.perf_counter() - ts, **metrics)
            if (t + 1) % schedule.domains.update_every == 0 and t + 1 < P:
                current = M.deterministic(state.params["log_alpha"], parent_config,
                                          temperature=schedule.l0.temperature)
                loader = update_weights(loader, masked_apply_fn(parent_config),
                                        {"model": state.params["model"], "masks": current}, t + 1)
            if save_every and (t + 1) % save_every == 0 and t + 1 < P:
                store.save(start + t + 1, state.params, {
                    **base_meta, "phase": "prune", "step": start + t + 1, "final": False, "loader": loader.to_dict(),
                    "wall_s": elapsed + time.perf_counter() - t0}, opt_state=state.opt_state)
        final_masks = M.deterministic(state.params["log_alpha"], parent_config, target, schedule.l0.temperature)
        params, config = prune(state.params["model"], parent_config, final_masks)
        del state
        ppl_before = _eval(config, params, eval_windows, eval_batch_size, event, "pruned")
        shardings = param_shardings(params, mesh)
        heal_state = init_train_state(params, heal, mesh, shardings)
        c_done = 0
        if C:  # the pruned model, so that a resume never prunes again
            store.save(start + P, params, {**base_meta, "phase": "continue", "step": start + P, "final": False,
                                            "config": config.to_dict(), "loader": loader.to_dict(),
                                            "ppl_before": ppl_before, "wall_s": elapsed + time.perf_counter() - t0})
    else:
        config = ModelConfig.from_dict(meta["config"])
        shardings = param_shardings(abstract_params(config), mesh)
        params, _ = store.restore(resume, abstract_params(config, shardings))
        heal_state = init_train_state(params, heal, mesh, shardings)
        c_done = resume - start - P
        if c_done:
            _, opt_state = store.restore(resume, _abstract(heal_state.params), _abstract(heal_state.opt_state))
            heal_state = heal_state.replace(step=heal_state.step + c_done, opt_state=opt_state)
        loader, ppl_before = dl.LoaderState.from_dict(meta["loader"]), meta["ppl_before"]

    # ---- continued training ----
    cont_meta = {**base_meta, "config": config.to_dict(), "ppl_before": ppl_before}
    if C > c_done:
        event("stage", phase="continue", steps=C, resume_step=c_done or None)
        step_fn = make_heal_step(config, heal, mesh, shardings)
        tokens_per_step = batch * T * heal.grad_accum
        for t in range(c_done, C):
            tokens, _, loader = dl.sample_batch(loader, train_windows, batch * heal.grad_accum, start + P + t, seed)
            ts = time.perf_counter()
            heal_state, metrics = step_fn(heal_state, tokens.reshape(heal.grad_accum, batch, T), None)
            metrics = {key: float(v) for key, v in metrics.items()}
            event("step", phase="continue", step=t + 1, steps=C, tokens=tokens_per_step,
                  seconds=time.perf_counter() - ts, **metrics)
            if (t + 1) % schedule.continue_update_every == 0 and t + 1 < C:
                loader = update_weights(loader, config, heal_state.params, P + t + 1)
            if save_every and (t + 1) % save_every == 0 and t + 1 < C:
                store.save(start + P + t + 1, heal_state.params, {
                    **cont_meta, "phase": "continue", "step": start + P + t + 1, "final": False,
                    "loader": loader.to_dict(), "wall_s": elapsed + time.perf_counter() - t0},
                    opt_state=heal_state.opt_state)
    params = heal_state.params
    ppl_after = _eval(config, params, eval_windows, eval_batch_size, event, "after") if C else ppl_before
    count = count_params(params)
    shape = {key: getattr(config, key) for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                   "intermediate_size")}
    prune_tokens = P * prune_batch * T * prune_heal.grad_accum
    continue_tokens = C * batch * T * heal.grad_accum
    result = ShearResult(index, member.name, count, count / parent_count, ppl_before, ppl_after,
                         prune_tokens + continue_tokens, elapsed + time.perf_counter() - t0, shape, prune_tokens,
                         continue_tokens, [[s, list(w)] for s, w in loader.history])
    store.save(start + P + C, params, {**cont_meta, "phase": "final", "step": start + P + C, "final": True,
                                       "params": count, "compression": count / parent_count,
                                       "tokens": result.tokens, "wall_s": result.wall_s, "ppl_after": ppl_after,
                                       "loader": loader.to_dict(), "result": dataclasses.asdict(result)})
    on_event("member", {"result": result, "restored": False})
    return result


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _eval(config, params, eval_sets, batch_size, event, when) -> dict[str, float]:
    out = {}
    for name, windows in eval_sets.items():
        result = perplexity(config, params, windows, batch_size=batch_size)
        event("eval", when=when, corpus=name, **result.to_dict())
        out[name] = result.ppl
    return out
