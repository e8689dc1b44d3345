"""Perplexity over non-overlapping windows (the reference protocol).

Each window x (T tokens) predicts its own tokens 1..T−1 from the tokens before them in the same window; no context
is carried across windows. Over N windows:

    NLL = −1/(N(T−1)) Σ_n Σ_{t=1}^{T−1} log softmax(logits[n, t−1])[x[n, t]],    PPL = exp(NLL).

One jitted step scores a batch [B, T] → per-window NLL sums (B,); the last batch is padded to B with weight 0, so
the step compiles once per (model, B, T). Sums are accumulated on the host in float64.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (params, tokens [B, T]) -> logits [B, T, vocab]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    seq_len: int  # window length T
    windows: int  # N
    tokens: int  # tokens scored: N · (T − 1)
    nll: float  # mean negative log-likelihood, nats per scored token
    ppl: float  # exp(nll)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=64)
def decoder_apply_fn(config: ModelConfig) -> ApplyFn:
    """`Decoder(config).apply({'params': params}, tokens)`; one function object per config, so jit caches hit."""

    def apply(params, tokens):
        return Decoder(config).apply({"params": params}, tokens)

    return apply


@functools.partial(jax.jit, static_argnums=0)
def window_nll_sums(apply_fn: ApplyFn, params, tokens: jax.Array, weights: jax.Array) -> jax.Array:
    """tokens [B, T], weights [B] → weights · Σ_{t≥1} −log p(x_t | x_<t), shape [B], float32."""
    logits = apply_fn(params, tokens)[:, :-1].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    return weights * nll.sum(axis=-1)


def perplexity(model: ModelConfig | ApplyFn, params, windows: np.ndarray, batch_size: int = 8,
               max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Mean NLL and PPL of the model over `windows` [N, T] (the first ceil(max_tokens / T) of them).

    model: a ModelConfig (run as `Decoder(config)`, T must not exceed config.max_seq_len) or an apply function
    `(params, tokens) -> logits`; pass the same function object each time to reuse the compiled step.
    progress(windows_done, windows_total) is called after each batch.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, T] with T >= 2, got shape {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    seq_len = windows.shape[1]
    if isinstance(model, ModelConfig):
        if seq_len > model.max_seq_len:
            raise ValueError(f"window length {seq_len} exceeds the model's max_seq_len {model.max_seq_len}; "
                             f"pack the text with seq_len <= {model.max_seq_len}")
        apply_fn = decoder_apply_fn(model)
    else:
        apply_fn = model
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens {max_tokens} must be >= 1")
        windows = windows[: math.ceil(max_tokens / seq_len)]
    n = len(windows)
    if n == 0:
        raise ValueError("no windows to score")
    batch_size = min(batch_size, n)
    total = 0.0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size]
        valid = len(batch)
        weights = np.zeros(batch_size, np.float32)
        weights[:valid] = 1.0
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, seq_len), batch.dtype)])
        sums = window_nll_sums(apply_fn, params, jnp.asarray(batch, jnp.int32), jnp.asarray(weights))
        total += float(np.asarray(sums, np.float64).sum())
        if progress is not None:
            progress(start + valid, n)
    tokens = n * (seq_len - 1)
    nll = total / tokens
    return Perplexity(seq_len=seq_len, windows=n, tokens=tokens, nll=nll, ppl=math.exp(nll) if nll < 700 else math.inf)


def perplexities(model: ModelConfig | ApplyFn, params, corpora, batch_size: int = 8,
                 progress: Callable[[str, int, int], None] | None = None,
                 report: Callable[..., None] | None = None) -> dict[str, Perplexity]:
    """`perplexity` on each corpus of `corpora` {name: windows [N, T]}, in order; progress(name, done, total)
    within a corpus, report(corpus=name, **Perplexity.to_dict()) after it (hooks: the library never prints)."""
    out = {}
    for name, windows in corpora.items():
        out[name] = perplexity(model, params, windows, batch_size=batch_size,
                               progress=None if progress is None else functools.partial(progress, name))
        if report is not None:
            report(corpus=name, **out[name].to_dict())
    return out


def geometric_mean(values) -> float:
    """(Π x_i)^(1/n) computed in log space; the summary statistic of per-corpus PPL ratios to the parent."""
    values = np.asarray(list(values), np.float64)
    if values.size == 0:
        raise ValueError("geometric mean of no values")
    return float(np.exp(np.mean(np.log(values))))


def ratios_to_parent(ppl: dict[str, float], parent_ppl: dict[str, float]) -> dict[str, float]:
    """corpus -> PPL / the parent's PPL on that corpus."""
    return {name: ppl[name] / parent_ppl[name] for name in ppl}


def geomean_ratio(ppl: dict[str, float], parent_ppl: dict[str, float]) -> float:
    """Geometric mean over the corpora of PPL / parent PPL: one number for "how far from the parent"."""
    return geometric_mean(ratios_to_parent(ppl, parent_ppl).values())
