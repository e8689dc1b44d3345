"""Healing: the losses (next-token cross-entropy, distillation on full or top-k logits), the optimizer and
one jitted, sharded step.

A step takes `grad_accum` micro-batches of packed tokens `(accum, B, T)`, averages the loss
`(1 − w)·CE + w·KD` and its gradient over them with `jax.lax.scan`, clips the global gradient norm and applies
AdamW with a warmup + cosine schedule. Params are float32 master weights; the model computes in
`HealConfig.dtype`. Only floating-point leaves of the params train; integer leaves (SLTrain's fixed support
`indices`) are carried unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from plrd_jax.nn.config import DTYPES, ModelConfig
from plrd_jax.nn.model import Decoder
from plrd_jax.nn.sharding import RULES, batch_sharding, param_shardings, replicated, shard_activations


# ---- losses ---------------------------------------------------------------------------------------------
def _mean_over_targets(per_position: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of (B, T−1) values, weighted by mask[:, 1:] (the weight of each target token) when given."""
    if mask is None:
        return per_position.mean()
    w = mask[:, 1:].astype(jnp.float32)
    total = w.sum()
    return jnp.where(total > 0, (per_position * w).sum() / jnp.where(total > 0, total, 1.0), 0.0)


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over b, t < T−1 of −log softmax(logits[b, t])[tokens[b, t+1]], in float32.

    logits (B, T, V), tokens (B, T) int; mask (B, T) optional: weight of tokens[b, t] as a target
    (mask[:, 0] is unused).
    """
    # CE at every position against the next token (the last one's target wraps around and is dropped after):
    # slicing the (B, T, V) logits instead would cost a padded copy of their gradient.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.roll(tokens, -1, axis=1))
    return _mean_over_targets(ce[:, :-1], mask)


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                 mask: jax.Array | None = None) -> jax.Array:
    """T² · mean over b, t < T−1 of KL(p‖q), p = softmax(teacher/T), q = softmax(student/T), in float32.

    Logits (B, T, V); the positions are those of `next_token_loss` (each predicts the next token).
    """
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)  # all positions, then the last dropped (see next_token_loss)
    return temperature ** 2 * _mean_over_targets(kl[:, :-1], mask)


def _top_k_mask(indices: jax.Array, vocab: int) -> jax.Array:
    """(..., V) bool, True at the `indices` (..., k) of each row."""
    lead = indices.shape[:-1]
    flat = indices.reshape(-1, indices.shape[-1])
    rows = jax.vmap(lambda i: jnp.zeros((vocab,), bool).at[i].set(True))(flat)
    return rows.reshape(*lead, vocab)


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """p · (log p − log q), 0 where p = 0 (log p = −inf), with no NaN in the value or the gradient."""
    has = log_p > -jnp.inf
    safe = jnp.where(has, log_p, 0.0)
    return jnp.where(has, jnp.exp(safe) * (safe - log_q), 0.0)


def teacher_top_k(teacher_logits: jax.Array, k: int, temperature: float = 1.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The teacher's top-k summary at temperature T: (indices (..., k) int32, log p_j of those tokens (..., k),
    log p_rest (...)), p = softmax(teacher/T) in float32 and p_rest = 1 − Σ_top p_j, the mass of the other V − k
    tokens. What a distillation run stores instead of the full (..., V) logits.

    log p_rest is log Σ_{j∉top} exp(t_j) − log Σ_j exp(t_j), a logsumexp over the complement (the top-k logits
    masked to −inf), so it stays accurate when the top-k mass rounds to 1 in float32 (log1p(−Σ p_top) would give
    −inf there). k = V gives log p_rest = −inf (an empty rest).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k distillation needs 1 <= k <= vocab size {vocab}, got k={k}")
    t = teacher_logits.astype(jnp.float32) / temperature
    top, indices = jax.lax.top_k(t, k)
    log_z = jax.nn.logsumexp(t, axis=-1)
    if k == vocab:
        log_rest = jnp.full(log_z.shape, -jnp.inf, jnp.float32)
    else:
        log_rest = jax.nn.logsumexp(jnp.where(_top_k_mask(indices, vocab), -jnp.inf, t), axis=-1) - log_z
    return indices.astype(jnp.int32), top - log_z[..., None], log_rest


def sparse_distill_loss(student_logits: jax.Array, indices: jax.Array, teacher_log_probs: jax.Array,
                        teacher_log_rest: jax.Array, temperature: float = 1.0,
                        mask: jax.Array | None = None) -> jax.Array:
    """T² · mean over b, t < T−1 of KL(p̃‖q̃) over the k + 1 buckets "token j" (j in `indices`) and "the rest".

    The teacher side comes as `teacher_top_k` gives it (indices (B, T, k), log p_j (B, T, k), log p_rest (B, T));
    q̃ is the student's softmax(student/T) on the same k tokens plus its own remaining mass
    q_rest = 1 − Σ_top q_j = Σ_{j∉top} q_j, taken as a logsumexp over the complement (the k tokens masked to
    −inf), in float32. A rest bucket whose teacher mass is 0 adds 0 (and no NaN gradient); with k = V there is
    no rest bucket and this is `distill_loss`. Positions and mask as in `distill_loss`.
    """
    s = student_logits.astype(jnp.float32) / temperature
    vocab, k = s.shape[-1], indices.shape[-1]
    log_z = jax.nn.logsumexp(s, axis=-1)
    log_q = jnp.take_along_axis(s, indices, axis=-1) - log_z[..., None]
    kl = jnp.sum(_kl_terms(teacher_log_probs.astype(jnp.float32), log_q), axis=-1)
    if k < vocab:
        log_q_rest = jax.nn.logsumexp(jnp.where(_top_k_mask(indices, vocab), -jnp.inf, s), axis=-1) - log_z
        kl = kl + _kl_terms(teacher_log_rest.astype(jnp.float32), log_q_rest)
    return temperature ** 2 * _mean_over_targets(kl[:, :-1], mask)


def distill_top_k_loss(student_logits: jax.Array, teacher_logits: jax.Array, k: int, temperature: float = 1.0,
                       mask: jax.Array | None = None) -> jax.Array:
    """Top-k distillation: T² · mean over b, t < T−1 of KL(p̃‖q̃), in float32, logits (B, T, V).

    With p = softmax(teacher/T), q = softmax(student/T) and S the teacher's k most likely tokens at (b, t):

        p̃ = (p_j for j in S, p_rest = 1 − Σ_{j∈S} p_j),   q̃ = (q_j for j in S, q_rest = 1 − Σ_{j∈S} q_j)
        KL(p̃‖q̃) = Σ_{j∈S} p_j log(p_j / q_j) + p_rest log(p_rest / q_rest)

    Only the teacher's top-k logits (and its rest mass) are used, as in sparse KD from stored teacher logits
    (`teacher_top_k` + `sparse_distill_loss`). By the log-sum inequality KL(p̃‖q̃) ≤ KL(p‖q), with equality
    at k = V (= `distill_loss`); its gradient pushes the student's top-k probabilities to the teacher's and
    its rest mass to the teacher's, without shaping the distribution inside the rest.
    """
    indices, log_p, log_rest = teacher_top_k(jax.lax.stop_gradient(teacher_logits), k, temperature)
    return sparse_distill_loss(student_logits, indices, log_p, log_rest, temperature, mask)


# ---- optimizer ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HealConfig:
    """Hyper-parameters of one healing run. One step sees grad_accum × B × T tokens."""

    lr: float = 2e-4
    warmup_steps: int = 10
    total_steps: int = 100
    end_lr_fraction: float = 0.1  # cosine decay from lr to end_lr_fraction · lr at total_steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0  # on 2-D matrices except the embedding table (see `decay_mask`)
    clip: float | None = 1.0  # global gradient-norm clip; None = no clipping
    grad_accum: int = 1  # micro-batches per step
    kd_weight: float = 0.0  # loss = (1 − w)·CE + w·KD; 0 = cross-entropy only
    kd_temperature: float = 1.0
    kd_top_k: int = 0  # KD on the teacher's top-k tokens + a rest bucket (`distill_top_k_loss`); 0 = full logits
    dtype: str = "float32"  # compute dtype; params stay float32

    def __post_init__(self):
        if not 0 <= self.warmup_steps <= self.total_steps or self.total_steps <= 0:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                             "total_steps > 0")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight {self.kd_weight} must lie in [0, 1]")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum {self.grad_accum} must be >= 1")
        if isinstance(self.kd_top_k, bool) or int(self.kd_top_k) != self.kd_top_k or self.kd_top_k < 0:
            raise ValueError(f"kd_top_k {self.kd_top_k} must be an integer >= 0 (0 = distill on the full logits)")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature {self.kd_temperature} must be positive")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown compute dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")

    def replace(self, **kw) -> "HealConfig":
        return dataclasses.replace(self, **kw)


def learning_rate_schedule(heal_config: HealConfig) -> optax.Schedule:
    """0 → lr linearly over warmup_steps, then cosine to end_lr_fraction · lr at total_steps (constant after)."""
    h = heal_config
    # optax needs a cosine of at least one step; with no steps left after warmup it is never reached anyway.
    decay_steps = max(h.total_steps, h.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, h.lr, h.warmup_steps, decay_steps, h.lr * h.end_lr_fraction)


def decay_mask(params) -> Any:
    """True for the leaves weight decay applies to: every 2-D matrix (dense kernels, low-rank factors A and B,
    an untied lm_head) except the embedding table; not norms, biases or SLTrain's sparse values.
    (On a factorized matrix, decay of A and B penalizes ‖A‖² + ‖B‖², i.e. bounds the nuclear norm of AB.)"""
    def decays(key_path, x):
        return x is not None and x.ndim == 2 and getattr(key_path[-1], "key", None) != "embedding"
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(heal_config: HealConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) → AdamW(schedule, b1, b2, eps, weight_decay on `decay_mask`).

    Apply it to `trainable(params)` (floating leaves; others are None)."""
    h = heal_config
    clip = optax.clip_by_global_norm(h.clip) if h.clip else optax.identity()
    adamw = optax.adamw(learning_rate_schedule(h), h.b1, h.b2, h.eps, weight_decay=h.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw)


def _is_trainable(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def trainable(params):
    """`params` with every non-floating leaf replaced by None (those do not train)."""
    return jax.tree.map(lambda x: x if _is_trainable(x) else None, params)


def _frozen(params):
    return jax.tree.map(lambda x: None if _is_trainable(x) else x, params)


def _merge(first, second):
    """Leaf of `first`, or of `second` where `first` holds None."""
    return jax.tree.map(lambda a, b: b if a is None else a, first, second, is_leaf=lambda x: x is None)


# ---- state and step -------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any  # the "params" collection, float32 master weights
    opt_state: Any  # optimizer state over `trainable(params)`


def _new_state(params, optimizer) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trainable(params)))


def train_state_shardings(abstract_state: TrainState, params_shardings, mesh: Mesh):
    """Shardings for a whole TrainState: any leaf whose trailing dict keys name a param of the same shape
    (params, Adam's mu and nu) gets that param's sharding; everything else is replicated."""
    shapes = {}
    for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_state.params),
                          jax.tree.leaves(params_shardings)):
        shapes[tuple(str(k.key) for k in kp)] = (x.shape, s)

    def pick(key_path, x):
        names = []
        for k in reversed(key_path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            names.insert(0, str(k.key))
        for i in range(len(names)):
            shape, s = shapes.get(tuple(names[i:]), (None, None))
            if shape == x.shape:
                return s
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def _abstract_params(config: ModelConfig):
    """The "params" of `config` as ShapeDtypeStructs."""
    return jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"]


def init_train_state(params, heal_config: HealConfig, mesh: Mesh, params_shardings=None,
                     rules=RULES) -> TrainState:
    """A fresh TrainState (step 0, zero Adam moments) with params and moments on their shardings.

    Floating params are cast to float32 (the master weights). params_shardings default
    `param_shardings(params, mesh, rules)`.
    """
    optimizer = make_optimizer(heal_config)
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if _is_trainable(x) and x.dtype != jnp.float32 else x,
                          params)
    if params_shardings is None:
        params_shardings = param_shardings(params, mesh, rules)
    abstract = jax.eval_shape(lambda p: _new_state(p, optimizer), params)
    shardings = train_state_shardings(abstract, params_shardings, mesh)
    params = jax.device_put(params, params_shardings)
    return jax.jit(lambda p: _new_state(p, optimizer), out_shardings=shardings)(params)


def make_heal_step(model_config: ModelConfig, heal_config: HealConfig, mesh: Mesh, params_shardings,
                   teacher: ModelConfig | None = None, rules=RULES) -> Callable:
    """The jitted step `step(state, tokens, teacher_params) -> (state, metrics)`.

    tokens (grad_accum, B, T) int32, B divisible by the mesh's data × fsdp size; teacher_params: the
    teacher's "params" (on `param_shardings(teacher_params, mesh, rules)`); pass None (always positionally)
    without a teacher.
    metrics: loss, ce, kd (0 without a teacher), grad_norm (before clipping), lr (of this step), all float32
    scalars averaged over the micro-batches. The input state is donated. When a teacher config is given its
    logits are computed in the step (no gradient) and KD is reported; kd_weight > 0 requires one. KD is
    `distill_loss` on the full logits, or `distill_top_k_loss` on the teacher's top kd_top_k tokens when
    kd_top_k > 0 (at most the teacher's vocab size).
    """
    h = heal_config
    if h.kd_weight > 0 and teacher is None:
        raise ValueError(f"kd_weight {h.kd_weight} > 0 needs a teacher config (and teacher_params in the step)")
    if teacher is not None and h.kd_top_k > teacher.vocab_size:
        raise ValueError(f"kd_top_k {h.kd_top_k} exceeds the teacher's vocab size {teacher.vocab_size}")
    student = Decoder(model_config.replace(dtype=h.dtype))
    teacher_model = None if teacher is None else Decoder(teacher.replace(dtype=h.dtype))
    optimizer, schedule = make_optimizer(h), learning_rate_schedule(h)

    abstract_state = jax.eval_shape(lambda p: _new_state(p, optimizer), _abstract_params(model_config))
    state_shardings = train_state_shardings(abstract_state, params_shardings, mesh)
    teacher_shardings = None
    if teacher is not None:
        teacher_shardings = param_shardings(_abstract_params(teacher), mesh, rules)
    micro_sharding = batch_sharding(mesh, rules=rules)

    def micro_loss(train_params, frozen, tokens, teacher_params):
        with shard_activations(mesh, rules):
            logits = student.apply({"params": _merge(train_params, frozen)}, tokens)
        ce = next_token_loss(logits, tokens)
        kd = jnp.zeros((), jnp.float32)
        if teacher_model is not None:
            with shard_activations(mesh, rules):
                teacher_logits = teacher_model.apply({"params": teacher_params}, tokens)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
            kd = (distill_top_k_loss(logits, teacher_logits, int(h.kd_top_k), h.kd_temperature) if h.kd_top_k
                  else distill_loss(logits, teacher_logits, h.kd_temperature))
        return (1.0 - h.kd_weight) * ce + h.kd_weight * kd, (ce, kd)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def constrain(grads):
        return jax.tree.map(lambda g, s: None if g is None else jax.lax.with_sharding_constraint(g, s),
                            grads, params_shardings, is_leaf=lambda x: x is None)

    def step(state: TrainState, tokens: jax.Array, teacher_params):
        if tokens.ndim != 3 or tokens.shape[0] != h.grad_accum:
            raise ValueError(f"tokens of shape {tokens.shape}: expected (grad_accum={h.grad_accum}, B, T)")
        train_params, frozen = trainable(state.params), _frozen(state.params)

        def accumulate(carry, micro_tokens):
            grads, sums = carry
            micro_tokens = jax.lax.with_sharding_constraint(micro_tokens, micro_sharding)
            (loss, (ce, kd)), g = grad_fn(train_params, frozen, micro_tokens, teacher_params)
            grads = constrain(jax.tree.map(jnp.add, grads, g))
            return (grads, sums + jnp.stack([loss, ce, kd])), None

        zeros = constrain(jax.tree.map(jnp.zeros_like, train_params))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(3, jnp.float32)), tokens)
        grads = jax.tree.map(lambda g: g / h.grad_accum, grads)
        loss, ce, kd = sums / h.grad_accum
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
        params = _merge(optax.apply_updates(train_params, updates), frozen)
        metrics = {"loss": loss, "ce": ce, "kd": kd, "grad_norm": grad_norm,
                   "lr": jnp.asarray(schedule(state.step), jnp.float32)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh, 1, rules), teacher_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


# ---- accounting -----------------------------------------------------------------------------------------
def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token: each projection as parameterized (dense d_in·d_out,
    low-rank / CoLA r·(d_in + d_out), SLTrain r·(d_in + d_out) + nnz) and the LM head (the embedding table
    when tied). The embedding lookup, norms and biases are not counted."""
    total = 0
    for path in config.matrix_paths():
        d_in, d_out = config.matrix_shape(path)
        spec = config.linear(path)
        total += d_in * d_out if spec.kind == "dense" else spec.rank * (d_in + d_out) + (spec.nnz or 0)
    if config.tie_embeddings:
        total += config.vocab_size * config.hidden_size
    return total


def model_flops_per_token(config: ModelConfig, seq_len: int | None = None, training: bool = True) -> int:
    """Model FLOPs per token (PaLM, appendix B): 6·N + 12·L·T·H·hd for a training step, 2·N + 4·L·T·H·hd for
    a forward pass; N = `matmul_params`, T = seq_len (default max_seq_len), H·hd = heads × head_dim (QKᵀ and
    AV, counted in full, without halving for the causal mask). MFU = tokens/s · this / peak FLOP/s."""
    T = config.max_seq_len if seq_len is None else seq_len
    forward = 2 * matmul_params(config) + 4 * config.num_layers * T * config.num_heads * config.head_dim_
    return 3 * forward if training else forward
