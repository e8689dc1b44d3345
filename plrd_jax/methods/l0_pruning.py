"""Sheared-LLaMA's pruning phase: hard-concrete masks learned against a Lagrangian on the target shape.

With masks z sampled once per step from log α (plrd_jax/nn/masks.py) and applied in the decoder, the loss is
    CE(model, z) + Σ_m mean_rows[ λ1_m (ŝ_m − t_m) + λ2_m (ŝ_m − t_m)² ]
over the mask types m ∈ {layer, head, int, hidden}: ŝ_m the expected sparsity 1 − mean P(z > 0) of each row
(one per layer for heads and intermediate dims), t_m the target's sparsity, ramped linearly from 0 over the
first `ramp_fraction` of the steps. For a GQA parent one more term, "kv_groups", does the same for how full the
kv groups are (`masks.group_fill`: min(1, expected heads / target heads per group)), so that the heads kept come
in whole groups of the target's size. `optax.multi_transform` trains three groups on one warmup + cosine shape:
the model with the healing optimizer (AdamW, clip), log α with Adam (lr 1.0) and the multipliers λ with Adam at
lr −1.0, i.e. gradient *ascent*. log α is clamped to [log 0.01, log 100] after every step. Clipping covers the
model's gradient only (Adam is scale-free for log α and λ anyway).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

import plrd_jax.nn.masks as M
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder, abstract_params
from plrd_jax.nn.sharding import RULES, param_shardings, replicated, shard_activations
from plrd_jax.training.loop import state_layout
from plrd_jax.training.losses import next_token_loss
from plrd_jax.training.optim import HealConfig, learning_rate_schedule, make_optimizer
from plrd_jax.training.state import TrainState, init_train_state
from plrd_jax.training.step import make_train_step

LAGRANGIAN_TERMS = M.MASK_NAMES + ("kv_groups",)  # one (λ1, λ2) each; kv_groups stays unused for MHA


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
    if model_shardings is None:
        model_shardings = param_shardings(params, mesh, rules)
    return init_train_state(init_prune_params(params, config, l0, seed), make_prune_optimizer(heal_config, l0),
                            mesh, prune_shardings(model_shardings, mesh))


def prune_state_layout(config: ModelConfig, heal_config: HealConfig, l0: L0Config, mesh: Mesh, model_shardings):
    """The pruning TrainState of `config`'s params as ShapeDtypeStructs with their shardings (a restore target)."""
    abstract_full = jax.eval_shape(lambda p: init_prune_params(p, config, l0), abstract_params(config))
    return state_layout(abstract_full, make_prune_optimizer(heal_config, l0), mesh,
                        prune_shardings(model_shardings, mesh))


def prune_loss(config: ModelConfig, target: M.TargetShape, l0: L0Config, mesh: Mesh, total_steps: int,
               dtype: str = "float32", seed: int = 0, rules=RULES):
    """loss_fn of the pruning phase over params {"model", "log_alpha", "lambdas"}: CE of the model run with
    masks z ~ hard-concrete(log α) (one sample per step, key fold_in(key(seed), step), the same in every
    micro-batch; its gradient reaches log α through the reparameterized sample) plus the Lagrangian of the
    ramped targets. Metrics: ce, lagrangian, expected_size, target_size and per term `sparsity/<m>`,
    `target/<m>`, `lambda1/<m>`, `lambda2/<m>`."""
    target = target.resolve(config)
    final_targets = lagrangian_targets(target, config)
    ramp_steps = int(round(l0.ramp_fraction * total_steps))
    target_size = float(M.matrix_size(target.config(config)))
    model = Decoder(config.replace(dtype=dtype))
    base_key = jax.random.key(seed)
    groups = (config.num_kv_heads, target.num_heads // target.num_kv_heads)

    def loss_fn(params, tokens, step, extra):
        masks = M.sample(params["log_alpha"], jax.random.fold_in(base_key, step), l0.temperature)
        with shard_activations(mesh, rules):
            logits = model.apply({"params": params["model"]}, tokens, masks=masks)
        ce = next_token_loss(logits, tokens)
        targets = ramped_targets(final_targets, step, ramp_steps)
        lag, sparsity = lagrangian(params["log_alpha"], params["lambdas"], targets, l0.temperature, groups)
        metrics = {"ce": ce, "lagrangian": lag,
                   "expected_size": M.expected_size(M.prob_nonzero(params["log_alpha"], l0.temperature), config),
                   "target_size": jnp.asarray(target_size, jnp.float32)}
        for name in targets:
            metrics.update({f"sparsity/{name}": sparsity[name], f"target/{name}": targets[name],
                            f"lambda1/{name}": params["lambdas"][name][0],
                            f"lambda2/{name}": params["lambdas"][name][1]})
        return ce + lag, metrics
    return loss_fn


def make_prune_step(config: ModelConfig, target: M.TargetShape, heal_config: HealConfig, l0: L0Config,
                    mesh: Mesh, model_shardings, total_steps: int, seed: int = 0, rules=RULES) -> Callable:
    """The jitted step `step(state, tokens, None) -> (state, metrics)` of the pruning phase: `make_train_step`
    with `prune_loss` and `make_prune_optimizer`; log α is clamped after every update and grad_norm is the
    model's. tokens (grad_accum, B, T). The input state is donated."""
    h = heal_config
    abstract_full = jax.eval_shape(lambda p: init_prune_params(p, config, l0), abstract_params(config))

    def clamp(params):
        return {**params, "log_alpha": M.clamp_log_alpha(params["log_alpha"])}
    return make_train_step(prune_loss(config, target, l0, mesh, total_steps, h.dtype, seed, rules),
                           make_prune_optimizer(h, l0), mesh, abstract_full, prune_shardings(model_shardings, mesh),
                           grad_accum=h.grad_accum, lr_schedule=learning_rate_schedule(h), post_update=clamp,
                           grad_norm_of=lambda grads: grads["model"], rules=rules)


@functools.lru_cache(maxsize=16)
def masked_apply_fn(config: ModelConfig):
    """(params {"model", "masks"}, tokens) -> logits of `config` run with the masks (for `perplexity`)."""

    def apply(params, tokens):
        return Decoder(config).apply({"params": params["model"]}, tokens, masks=params["masks"])
    return apply
