"""GGUF checkpoints of the llama architecture (llama.cpp's format), dequantized to dense params.

GGUF names map to HF names (then to ours, see `hf.py`):

  token_embd  -> model.embed_tokens          blk.N.attn_{q,k,v,output} -> model.layers.N.self_attn.{q,k,v,o}_proj
  output_norm -> model.norm                  blk.N.ffn_{gate,up,down}  -> model.layers.N.mlp.{gate,up,down}_proj
  output      -> lm_head (absent: tied)      blk.N.attn_norm / ffn_norm -> input_ / post_attention_layernorm

A tensor with dims `ne = [ne0, ne1]` (ne0 fastest) dequantizes to a row-major (ne1, ne0) array: HF's (out, in).
llama.cpp's converter permuted the rows of q and k per head from rotate-half to interleaved pairs,
`w.reshape(n, 2, hd/2, d).swapaxes(1, 2)`; `unpermute_rotary` inverts it (n = heads for q, kv heads for k).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from plrd_jax.nn.config import ConfigError, ModelConfig
from plrd_jax.io.hf import CheckpointError, dtype_name, params_from_hf

ARCHITECTURE = "llama"
GGUF_MAGIC = b"GGUF"
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(source: str | os.PathLike | GGUFReader) -> GGUFReader:
    if isinstance(source, GGUFReader):
        return source
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a readable GGUF file: it does not start with the GGUF magic bytes "
                              f"({size:,} bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on a short or damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file: truncated or corrupt ({size:,} bytes; the "
                              f"reader stopped at: {type(e).__name__})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{path} is not a readable GGUF file: truncated ({size:,} bytes where its tensors "
                              f"need {end:,})")
    return reader


def metadata(reader: GGUFReader) -> dict:
    """Scalar and string metadata (arrays such as the vocabulary are left out: read them from `reader.fields`)."""
    out = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1:
            out[key] = field.contents()
    return out


def gguf_name_to_hf(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (n, hd/2, 2) -> (n, 2, hd/2). w: (n·hd, ...) -> same shape."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader: GGUFReader, dtype=None) -> ModelConfig:
    """Our ModelConfig from the `llama.*` and `tokenizer.ggml.*` metadata."""
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise CheckpointError(f"GGUF architecture is {arch!r}; only {ARCHITECTURE!r} is supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"rope scaling {scaling!r} is not supported; only plain RoPE is")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks llama.{name}")
        return value

    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError("GGUF has no token_embd.weight tensor")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dim = int(key("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise CheckpointError(f"partial rotary (rope.dimension_count {rotary_dim} < head_dim {head_dim}) "
                              f"is not supported")
    vocab = int(meta.get("llama.vocab_size", int(names["token_embd.weight"].shape[1])))
    name = dtype_name(dtype) if dtype is not None else "float32"
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")), num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)), head_dim=head_dim,
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(key("context_length", 2048)), tie_embeddings="output.weight" not in names,
            param_dtype=name, dtype=name, bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    except ConfigError as e:
        raise CheckpointError(f"GGUF metadata describes no valid model: {e}") from None


def check_types(reader: GGUFReader) -> None:
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise CheckpointError(f"tensor {t.name} is quantized as {t.tensor_type.name}, which is not supported; "
                                  f"supported: {', '.join(q.name for q in SUPPORTED_TYPES)}")


def read_tensor(tensor) -> np.ndarray:
    """A GGUF tensor dequantized to float32, shape reversed(ne): (ne1, ne0) for a matrix."""
    array = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(array, dtype=np.float32).reshape(shape)


def hf_tensors(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout) for each tensor, q/k rows un-permuted, one at a time."""
    for tensor in reader.tensors:
        name = gguf_name_to_hf(tensor.name)
        if name is None:
            raise CheckpointError(f"unexpected GGUF tensor {tensor.name}: not part of a llama model")
        array = read_tensor(tensor)
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            n_heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            if array.shape[0] != n_heads * config.head_dim_:
                raise CheckpointError(f"tensor {tensor.name} has {array.shape[0]} rows; the config implies "
                                      f"{n_heads} heads × {config.head_dim_}")
            array = unpermute_rotary(array, n_heads)
        yield name, array


def load_gguf(source: str | os.PathLike | GGUFReader, dtype=None) -> tuple[ModelConfig, dict]:
    """(config, params) from a llama GGUF, dequantized; params in `dtype` (default float32), also the compute
    dtype."""
    reader = open_gguf(source)
    config = config_from_gguf(reader, dtype)
    check_types(reader)
    return config, params_from_hf(hf_tensors(reader, config), config)
