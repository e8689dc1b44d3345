"""Grouped-query causal attention against a plain numpy reference, with and without skipped causal blocks."""
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.model import causal_blocks, masked_attention


def numpy_attention(q, k, v, z_head=None):
    """Per query head h: softmax(q_h k_g(h)ᵀ / √hd + causal mask) v_g(h), g(h) = h // (H / KV)."""
    B, T, H, hd = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for h in range(H):
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h // G]) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), v[:, :, h // G])
        if z_head is not None:
            out[:, :, h] *= z_head[h]
    return out


@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_masked_attention_matches_numpy(blocks):
    rng = np.random.default_rng(blocks)
    B, T, H, KV, hd = 2, 32, 6, 2, 8
    q, k, v = (rng.standard_normal((B, T, n, hd)).astype(np.float32) for n in (H, KV, KV))
    z_head = rng.uniform(0, 1, H).astype(np.float32)
    positions = np.broadcast_to(np.arange(T) + 5, (B, T))  # any increasing positions
    out = masked_attention(*map(jnp.asarray, (q, k, v, positions, positions, z_head)), jnp.float32, blocks)
    np.testing.assert_allclose(np.asarray(out).reshape(B, T, H, hd), numpy_attention(q, k, v, z_head),
                               rtol=1e-5, atol=1e-5)


def test_causal_blocks_choice():
    assert [causal_blocks(t) for t in (16, 127, 128, 192, 256, 257, 1001, 1024)] == [1, 1, 2, 3, 4, 1, 7, 8]


def test_blocks_must_divide_the_sequence():
    x = jnp.zeros((1, 30, 2, 4))
    pos = jnp.arange(30)[None]
    with pytest.raises(ValueError, match="4 causal blocks need T = S divisible"):
        masked_attention(x, x, x, pos, pos, None, jnp.float32, 4)
