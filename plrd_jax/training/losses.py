"""Training losses on logits (B, T, V) and packed tokens (B, T): next-token cross-entropy and distillation from
a teacher's logits, on the full vocabulary or on the teacher's top-k tokens plus a rest bucket."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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
