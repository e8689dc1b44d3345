"""Text generation with a KV cache: one jitted prefill, then one jitted single-token step per new token."""
from __future__ import annotations

from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import Decoder, init_cache


def _pick(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature). logits: (B, vocab)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, logits / temperature, axis=-1)


@partial(jax.jit, static_argnames=("config", "temperature"))
def _prefill(config, params, prompt, cache, key, temperature):
    logits, cache = Decoder(config).apply({"params": params}, prompt, cache=cache,
                                          positions=jnp.broadcast_to(jnp.arange(prompt.shape[1]), prompt.shape))
    return _pick(logits[:, -1], key, temperature), cache


@partial(jax.jit, static_argnames=("config", "temperature"), donate_argnames=("cache",))
def decode_step(config, params, token, position, cache, key, temperature):
    """One new token per sequence: token (B,) at `position` through the model, its k and v written into the
    cache (donated), the next token picked; returns (next token (B,), cache)."""
    positions = jnp.full((token.shape[0], 1), position)
    logits, cache = Decoder(config).apply({"params": params}, token[:, None], positions=positions, cache=cache)
    return _pick(logits[:, -1], key, temperature), cache


def generate(config: ModelConfig, params, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, stop_token: int | None = None) -> Iterator[int]:
    """Yields new token ids one by one (greedy when temperature == 0)."""
    total = len(prompt) + max_new_tokens
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    if total > config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {config.max_seq_len} tokens")
    key = jax.random.key(seed)
    cache = init_cache(config, 1, total)
    key, sub = jax.random.split(key)
    token, cache = _prefill(config, params, jnp.asarray([prompt], jnp.int32), cache, sub, temperature)
    for position in range(len(prompt), total):
        t = int(token[0])
        yield t
        if t == stop_token or position == total - 1:
            return
        key, sub = jax.random.split(key)
        token, cache = decode_step(config, params, token, position, cache, sub, temperature)


def sample_windows(config: ModelConfig, params, count: int, seq_len: int, start_token: int,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 32) -> jax.Array:
    """`count` windows [count, seq_len] of text the model writes itself: each window starts with `start_token`
    (e.g. the end-of-text token that separates documents, so the model begins a document of its own choosing)
    and continues with tokens sampled from softmax(logits / temperature), batch_size windows at a time with a
    KV cache. At temperature 1 these are draws from the model's own distribution: data that covers what it
    knows in proportion to how it knows it, without choosing domains."""
    if count < 1 or seq_len < 2 or temperature <= 0:
        raise ValueError(f"need count >= 1, seq_len >= 2 and temperature > 0; got {count}, {seq_len}, {temperature}")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {config.max_seq_len} tokens")
    key = jax.random.key(seed)
    out = []
    for start in range(0, count, batch_size):
        cache = init_cache(config, batch_size, seq_len)
        prompt = jnp.full((batch_size, 1), start_token, jnp.int32)
        key, sub = jax.random.split(key)
        token, cache = _prefill(config, params, prompt, cache, sub, temperature)
        rows = [prompt[:, 0], token]
        for position in range(1, seq_len - 1):
            key, sub = jax.random.split(key)
            token, cache = decode_step(config, params, token, position, cache, sub, temperature)
            rows.append(token)
        out.append(jnp.stack(rows, axis=1)[: count - start])
    return jnp.concatenate(out).astype(jnp.int32)
