"""Parameter and FLOP accounting of a model: what a member costs to store and to run.

count_params counts any pytree's array elements; matmul_params and model_flops_per_token read a ModelConfig
(dense d_in·d_out, low-rank r·(d_in + d_out), sparse-plus-low-rank r·(d_in + d_out) + nnz per projection).
"""
from __future__ import annotations

import jax

from plrd_jax.nn.config import ModelConfig


def count_params(params) -> int:
    """Number of array elements in the pytree `params` (every leaf counts, integer index leaves included)."""
    return sum(x.size for x in jax.tree.leaves(params))


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
