"""GGUF checkpoints of the llama architecture (llama.cpp's format), dequantized to dense params.

GGUF names map to HF names (then to ours, see `hf.py`):

  token_embd  -> model.embed_tokens          blk.N.attn_{q,k,v,output} -> model.layers.N.self_attn.{q,k,v,o}_proj
  output_norm -> model.norm                  blk.N.ffn_{gate,up,down}  -> model.layers.N.mlp.{gate,up,down}_proj
  output      -> lm_head (absent: tied)      blk.N.attn_norm / ffn_norm -> input_ / post_attention_layernorm

A tensor with dims `ne = [ne0, ne1]` (ne0 fastest) dequantizes to a row-major (ne1, ne0) array: HF's (out, in).
llama.cpp's converter permuted the rows of q and k per head from rotate-half to interleaved pairs,
`w.reshape(n, 2, hd/2, d).swapaxes(1, 2)`; `unpermute_rotary` inverts it (n = heads for q, kv heads for k).
`save_gguf` writes the same layout (`permute_rotary`, the converter's permutation) from a dense model.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_VERSION, GGUFReader, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

from plrd_jax.nn.config import ConfigError, ModelConfig
from plrd_jax.io.hf import CheckpointError, dtype_name, hf_state_dict, params_from_hf

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


# ---- writing --------------------------------------------------------------------------------------
# --dtype -> GGUF tensor type of every matrix (norms stay F32, as llama.cpp's converter keeps them).
GGUF_TYPES = {"float32": Q.F32, "float16": Q.F16, "bfloat16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {Q.F32: "ALL_F32", Q.F16: "MOSTLY_F16", Q.BF16: "MOSTLY_BF16", Q.Q8_0: "MOSTLY_Q8_0"}
_TO_GGUF = {**{hf: gguf for gguf, hf in _GLOBAL_NAMES.items()}, **{hf: gguf for gguf, hf in _BLOCK_NAMES.items()}}


def hf_name_to_gguf(name: str) -> str:
    """The inverse of `gguf_name_to_hf`: "model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"."""
    if name in _TO_GGUF:
        return _TO_GGUF[name]
    _, _, layer, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (the inverse of `unpermute_rotary`): rows (n, 2, hd/2) -> (n, hd/2, 2),
    rotate-half pairs (i, i + hd/2) made adjacent for its interleaved rope. w: (n·hd, ...) -> same shape."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(name: str, array: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    """(data, raw_dtype) for `GGUFWriter.add_tensor`: vectors F32, matrices as `qtype` (rows of a Q8_0 matrix
    are blocks of 32, so its row length ne0 must be a multiple of 32)."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 1 or qtype == Q.F32:
        return array, None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    if qtype == Q.Q8_0 and array.shape[-1] % 32:
        raise CheckpointError(f"tensor {name} has rows of {array.shape[-1]} values; Q8_0 needs a multiple of 32")
    return quantize(array, qtype), qtype


def _write_metadata(writer: GGUFWriter, config: ModelConfig, qtype: Q, name: str, tokenizer) -> None:
    """general.*, llama.* hyperparameters (what `config_from_gguf` and llama.cpp read) and the tokenizer."""
    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType[_FILE_TYPES[qtype]]))
    if qtype == Q.Q8_0:
        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim_)
    writer.add_value_length(config.head_dim_)
    writer.add_rope_dimension_count(config.head_dim_)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if tokenizer is not None:
        fields = tokenizer.gguf_fields(config.vocab_size)  # plrd_jax.io.tokenizer.Tokenizer
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(fields["pre"])
        writer.add_token_list(fields["tokens"])
        writer.add_token_types(fields["types"])
        writer.add_token_merges(fields["merges"])
        writer.add_add_bos_token(False)
    for key in ("bos", "eos"):  # the tokenizer's own ids (they name its tokens) before the config's
        token = getattr(tokenizer, f"{key}_token_id", None)
        token = getattr(config, f"{key}_token_id") if token is None else token
        if token is not None:
            getattr(writer, f"add_{key}_token_id")(int(token))


def save_gguf(params, config: ModelConfig, file: str | os.PathLike, tokenizer=None, dtype: str = "float32",
              name: str = "plrd") -> Path:
    """Write a dense llama model as one GGUF file the way llama.cpp's converter does: llama.* metadata, the
    tokenizer, q/k rows permuted (`permute_rotary`), matrices in `dtype` (GGUF_TYPES), norms F32, no output
    tensor when the head is tied. `load_gguf` and transformers' GGUF loader read it back."""
    factorized = [path for path, spec in config.linears if spec.kind != "dense"]
    if factorized:
        raise CheckpointError(f"{factorized[0]} is a {config.linear(factorized[0]).kind} matrix; a GGUF holds "
                              f"dense matrices only")
    if config.qkv_bias:
        raise CheckpointError("a model with q/k/v bias (Qwen2) cannot be written as a llama GGUF")
    if dtype not in GGUF_TYPES:
        raise CheckpointError(f"GGUF tensor type {dtype!r} is not one of {', '.join(GGUF_TYPES)}")
    qtype = GGUF_TYPES[dtype]
    writer = GGUFWriter(os.fspath(file), ARCHITECTURE)
    _write_metadata(writer, config, qtype, name, tokenizer)
    for hf, array in hf_state_dict(params, config).items():
        if ".q_proj." in hf or ".k_proj." in hf:
            array = permute_rotary(array, config.num_heads if ".q_proj." in hf else config.num_kv_heads)
        data, raw_dtype = encode_tensor(hf, array, qtype)
        writer.add_tensor(hf_name_to_gguf(hf), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(file)
