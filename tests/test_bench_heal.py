"""The heal benchmark's --no-attention-core stand-in: the attention output's shape, with and without a KV cache,
and every projection still in use (else XLA would drop it and the ablation would time less than the model)."""
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_heal import values_passthrough  # noqa: E402

from plrd_jax.nn.config import ModelConfig  # noqa: E402
from plrd_jax.nn.model import Decoder, init_params, masked_attention  # noqa: E402

TINY = ModelConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6,
                   num_kv_heads=2, max_seq_len=16)


def test_passthrough_has_the_attention_output_shape():
    rng = np.random.default_rng(0)
    B, T, S, H, KV, hd = 2, 4, 8, 6, 2, 4
    q = rng.standard_normal((B, T, H, hd)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, KV, hd)).astype(np.float32) for _ in range(2))
    pos, k_pos = np.broadcast_to(np.arange(T) + S - T, (B, T)), np.broadcast_to(np.arange(S), (B, S))
    expected = masked_attention(q, k, v, pos, k_pos, None, jnp.float32).shape
    assert values_passthrough(q, k, v, pos, k_pos, None, jnp.float32).shape == expected == (B, T, KV, H // KV, hd)


def test_every_projection_reaches_the_logits_without_the_attention_core():
    params = init_params(TINY)
    tokens = jnp.arange(16).reshape(2, 8) % TINY.vocab_size
    with mock.patch("plrd_jax.nn.model.masked_attention", side_effect=values_passthrough) as stand_in:
        grads = jax.grad(lambda p: Decoder(TINY).apply({"params": p}, tokens).sum())(params)
    assert stand_in.call_count == (1 if TINY.scan_layers else TINY.num_layers)  # looked up at call time
    for name in ("q", "k", "v", "o"):
        g = next(iter(jax.tree.leaves(grads["layers_0"]["attn"][name])))
        assert float(jnp.abs(g).max()) > 0, name
