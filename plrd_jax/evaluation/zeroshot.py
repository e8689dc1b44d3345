"""Zero-shot multiple-choice evaluation, scored as lm-evaluation-harness scores it.

Each choice i of an example is a (context_i, continuation_i) pair; its score is the summed log-likelihood

    ll_i = Σ_{t ∈ continuation_i} log p(x_t | x_<t),

with the pair tokenized as lm-eval does (trailing spaces of the context move to the continuation; the context
alone and context + continuation are encoded, the continuation is what the second adds). Then

    acc      = 1[argmax_i ll_i = gold],     acc_norm = 1[argmax_i ll_i / len(choice_i) = gold]

(len in characters of the choice text, as lm-eval normalizes). Requests are sorted by length, padded to a
power-of-two bucket and scored in batches by one jitted function per (batch, bucket) shape.
Tasks and their loading: plrd_jax/evaluation/tasks.py.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.evaluation.perplexity import ApplyFn, decoder_apply_fn


from plrd_jax.evaluation.tasks import Task, ZeroShotError


# ---- tokenization as lm-eval does it --------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HF backend makes them (`_encode_pair`)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if context == "":
        cont = tokenizer.encode(continuation)
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_bos=add_bos)
    ctx = tokenizer.encode(context, add_bos=add_bos)
    return ctx, whole[len(ctx):]


# ---- scoring -------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def continuation_scores(apply_fn: ApplyFn, params, inputs, targets, start, length):
    """inputs, targets [B, T] (targets = inputs shifted by one); positions start ≤ t < length are the
    continuation. Returns (Σ_t log p(targets_t | inputs_≤t), all those targets greedy) per row."""
    logits = apply_fn(params, inputs).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    t = jnp.arange(inputs.shape[1])[None, :]
    mask = (t >= start[:, None]) & (t < length[:, None])
    greedy = jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~mask, axis=-1)
    return jnp.sum(jnp.where(mask, token_lp, 0.0), axis=-1), greedy


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def loglikelihoods(model: ModelConfig | ApplyFn, params, requests: list[tuple[list[int], list[int]]],
                   batch_size: int = 16, max_length: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ll, is_greedy) per (context tokens, continuation tokens) request, in request order.

    Like lm-eval, the sequence is context + continuation minus its last token, left-truncated to max_length
    (default: the model's max_seq_len) and right-padded; scored in batches sorted by length."""
    if isinstance(model, ModelConfig):
        max_length = max_length or model.max_seq_len
        apply_fn = decoder_apply_fn(model)
    else:
        apply_fn = model
        max_length = max_length or 2048
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise ZeroShotError("a choice encodes to no continuation tokens")
        tokens = (list(ctx) + list(cont))[-(max_length + 1):]
        rows.append((tokens, min(len(cont), len(tokens) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    ll, greedy = np.zeros(len(rows), np.float64), np.zeros(len(rows), bool)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        width = _bucket(max(len(rows[i][0]) - 1 for i in chunk))
        inputs = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        start = np.zeros(batch_size, np.int32)
        length = np.zeros(batch_size, np.int32)  # padding rows: empty mask
        for j, i in enumerate(chunk):
            tokens, n_cont = rows[i]
            n = len(tokens) - 1
            inputs[j, :n], targets[j, :n] = tokens[:-1], tokens[1:]
            start[j], length[j] = n - n_cont, n
        sums, all_greedy = continuation_scores(apply_fn, params, jnp.asarray(inputs), jnp.asarray(targets),
                                               jnp.asarray(start), jnp.asarray(length))
        sums, all_greedy = np.asarray(sums, np.float64), np.asarray(all_greedy)
        for j, i in enumerate(chunk):
            ll[i], greedy[i] = sums[j], all_greedy[j]
        if progress is not None:
            progress(min(b + batch_size, len(order)), len(order))
    return ll, greedy


@dataclasses.dataclass
class TaskResult:
    task: str
    examples: int
    acc: float
    acc_norm: float
    acc_stderr: float  # sample standard error of the mean, as lm-eval reports it
    lls: list[list[float]]  # per example, per choice
    golds: list[int]

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "examples": self.examples, "acc": self.acc, "acc_norm": self.acc_norm,
                "acc_stderr": self.acc_stderr}


def score_task(task: Task, lls: list[np.ndarray]) -> TaskResult:
    """acc and acc_norm from per-choice log-likelihoods (ties go to the first choice, as np.argmax)."""
    correct, correct_norm = [], []
    for ex, ll in zip(task.examples, lls):
        lengths = np.array([float(len(c)) for c in ex.choices])
        correct.append(float(np.argmax(ll) == ex.gold))
        correct_norm.append(float(np.argmax(ll / lengths) == ex.gold))
    n = len(correct)
    acc = float(np.mean(correct))
    stderr = float(np.std(correct, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return TaskResult(task.name, n, acc, float(np.mean(correct_norm)), stderr, [list(map(float, x)) for x in lls],
                      [ex.gold for ex in task.examples])


def evaluate_task(model: ModelConfig | ApplyFn, params, tokenizer, task: Task, batch_size: int = 16,
                  add_bos: bool = False, max_length: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> TaskResult:
    """Score every choice of every example of `task` and return acc / acc_norm."""
    requests, owners = [], []
    for k, ex in enumerate(task.examples):
        for ctx, cont in zip(ex.contexts, ex.continuations):
            requests.append(encode_pair(tokenizer, ctx, cont, add_bos))
            owners.append(k)
    ll, _ = loglikelihoods(model, params, requests, batch_size, max_length, progress)
    per_example = [[] for _ in task.examples]
    for k, value in zip(owners, ll):
        per_example[k].append(value)
    return score_task(task, [np.array(x) for x in per_example])
