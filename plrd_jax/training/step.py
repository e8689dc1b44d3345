"""The one training step builder, and the healing step built with it.

`make_train_step(loss_fn, optimizer, ...)` returns the jitted, sharded
    step(state, tokens (grad_accum, B, T), extra) -> (state, metrics)
that averages `loss_fn` and its gradient over the `grad_accum` micro-batches with `jax.lax.scan` (gradients
constrained to the params' shardings as they accumulate), applies `optimizer` to the trainable (floating)
leaves and carries the others unchanged. Every training run — PLRD healing, Sheared pruning (loss + Lagrangian
over model, log α and λ) and continued training, pretraining — is this step with its own loss.

Healing (`make_heal_step`): loss = (1 − w)·CE + w·KD with w = kd_weight, KD from a teacher's logits computed in
the step without gradient; params are float32 master weights, the model computes in `HealConfig.dtype`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder, abstract_params
from plrd_jax.nn.sharding import RULES, batch_sharding, param_shardings, replicated, shard_activations
from plrd_jax.training.losses import distill_loss, distill_top_k_loss, next_token_loss
from plrd_jax.training.optim import HealConfig, learning_rate_schedule, make_optimizer
from plrd_jax.training.state import TrainState, frozen, merge, new_state, train_state_shardings, trainable

# loss_fn(params, tokens (B, T), step (int32 scalar), extra) -> (loss, {metric name: float32 scalar})
LossFn = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh: Mesh, params_abstract,
                    params_shardings, *, grad_accum: int = 1, lr_schedule: optax.Schedule | None = None,
                    extra_shardings=None, post_update: Callable[[Any], Any] | None = None,
                    grad_norm_of: Callable[[Any], Any] | None = None, rules=RULES) -> Callable:
    """The jitted `step(state, tokens, extra) -> (state, metrics)` of a TrainState over `params_abstract`.

    tokens (grad_accum, B, T) int32, B divisible by the mesh's data × fsdp size; `extra` (e.g. a teacher's
    params, on `extra_shardings`; pass None positionally when there is none) reaches every `loss_fn` call.
    With g_i = ∇ loss_fn on micro-batch i, the update uses ḡ = (1/accum) Σ_i g_i; metrics are loss_fn's
    (averaged the same way) plus "loss", "grad_norm" (‖ḡ‖₂ before clipping, of `grad_norm_of(ḡ)` when given)
    and "lr" (`lr_schedule(step)`, when given). `post_update(params)` runs after the update (e.g. clamping).
    The input state is donated.
    """
    abstract_state = jax.eval_shape(lambda p: new_state(p, optimizer), params_abstract)
    state_shardings = train_state_shardings(abstract_state, params_shardings, mesh)
    micro_sharding = batch_sharding(mesh, rules=rules)

    def micro_loss(train_params, frozen_params, tokens, step, extra):
        return loss_fn(merge(train_params, frozen_params), tokens, step, extra)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def constrain(grads):
        return jax.tree.map(lambda g, s: None if g is None else jax.lax.with_sharding_constraint(g, s),
                            grads, params_shardings, is_leaf=lambda x: x is None)

    def step(state: TrainState, tokens: jax.Array, extra):
        if tokens.ndim != 3 or tokens.shape[0] != grad_accum:
            raise ValueError(f"tokens of shape {tokens.shape}: expected (grad_accum={grad_accum}, B, T)")
        train_params, frozen_params = trainable(state.params), frozen(state.params)

        def accumulate(carry, micro_tokens):
            grads, sums = carry
            micro_tokens = jax.lax.with_sharding_constraint(micro_tokens, micro_sharding)
            (loss, aux), g = grad_fn(train_params, frozen_params, micro_tokens, state.step, extra)
            grads = constrain(jax.tree.map(jnp.add, grads, g))
            return (grads, jax.tree.map(jnp.add, sums, {"loss": loss, **aux})), None

        _, aux_shapes = jax.eval_shape(micro_loss, train_params, frozen_params, tokens[0], state.step, extra)
        zero_sums = {"loss": jnp.zeros((), jnp.float32), **jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                                         aux_shapes)}
        zeros = constrain(jax.tree.map(jnp.zeros_like, train_params))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), tokens)
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        metrics = jax.tree.map(lambda s: s / grad_accum, sums)
        metrics["grad_norm"] = optax.tree.norm(grads if grad_norm_of is None else grad_norm_of(grads))
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
        params = merge(optax.apply_updates(train_params, updates), frozen_params)
        if post_update is not None:
            params = post_update(params)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh, 1, rules), extra_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def heal_loss(model_config: ModelConfig, heal_config: HealConfig, mesh: Mesh, teacher: ModelConfig | None = None,
              rules=RULES) -> LossFn:
    """loss_fn of healing: (1 − w)·CE + w·KD (w = kd_weight); metrics ce and kd (0 without a teacher). KD is
    `distill_loss` on the full logits, or `distill_top_k_loss` on the teacher's top kd_top_k tokens."""
    h = heal_config
    student = Decoder(model_config.replace(dtype=h.dtype))
    teacher_model = None if teacher is None else Decoder(teacher.replace(dtype=h.dtype))

    def loss_fn(params, tokens, step, teacher_params):
        with shard_activations(mesh, rules):
            logits = student.apply({"params": params}, tokens)
        ce = next_token_loss(logits, tokens)
        kd = jnp.zeros((), jnp.float32)
        if teacher_model is not None:
            with shard_activations(mesh, rules):
                teacher_logits = teacher_model.apply({"params": teacher_params}, tokens)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
            kd = (distill_top_k_loss(logits, teacher_logits, int(h.kd_top_k), h.kd_temperature) if h.kd_top_k
                  else distill_loss(logits, teacher_logits, h.kd_temperature))
        return (1.0 - h.kd_weight) * ce + h.kd_weight * kd, {"ce": ce, "kd": kd}
    return loss_fn


def make_heal_step(model_config: ModelConfig, heal_config: HealConfig, mesh: Mesh, params_shardings,
                   teacher: ModelConfig | None = None, rules=RULES) -> Callable:
    """The jitted healing step `step(state, tokens, teacher_params) -> (state, metrics)` (`make_train_step`
    with `heal_loss` and `make_optimizer(heal_config)`).

    tokens (grad_accum, B, T); teacher_params: the teacher's "params" (on `param_shardings(teacher_params,
    mesh, rules)`), None (always positionally) without a teacher; kd_weight > 0 requires a teacher config and
    kd_top_k at most its vocab size. metrics: loss, ce, kd, grad_norm (before clipping), lr (of this step).
    """
    h = heal_config
    if h.kd_weight > 0 and teacher is None:
        raise ValueError(f"kd_weight {h.kd_weight} > 0 needs a teacher config (and teacher_params in the step)")
    if teacher is not None and h.kd_top_k > teacher.vocab_size:
        raise ValueError(f"kd_top_k {h.kd_top_k} exceeds the teacher's vocab size {teacher.vocab_size}")
    teacher_shardings = None
    if teacher is not None:
        teacher_shardings = param_shardings(abstract_params(teacher), mesh, rules)
    return make_train_step(heal_loss(model_config, h, mesh, teacher, rules), make_optimizer(h), mesh,
                           abstract_params(model_config), params_shardings, grad_accum=h.grad_accum,
                           lr_schedule=learning_rate_schedule(h), extra_shardings=teacher_shardings, rules=rules)
