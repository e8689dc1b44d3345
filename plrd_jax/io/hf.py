"""Hugging Face checkpoints: safetensors + config.json in, dense safetensors + config.json out.

Layout (LLaMA, Mistral, SmolLM2, Qwen2 names; HF weights are (out, in), our kernels (in, out) = weightᵀ):

  model.embed_tokens.weight                        (vocab, d)    -> embed/embedding
  model.layers.N.self_attn.{q,k,v,o}_proj.weight   (out, in)     -> layers_N/attn/{q,k,v,o}/kernel (transposed)
  model.layers.N.self_attn.{q,k,v}_proj.bias       (out,)        -> layers_N/attn/{q,k,v}/bias (Qwen2)
  model.layers.N.mlp.{gate,up,down}_proj.weight    (out, in)     -> layers_N/mlp/{gate,up,down}/kernel (transposed)
  model.layers.N.input_layernorm.weight            (d,)          -> layers_N/attn_norm/scale
  model.layers.N.post_attention_layernorm.weight   (d,)          -> layers_N/mlp_norm/scale
  model.norm.weight                                (d,)          -> final_norm/scale
  lm_head.weight                                   (vocab, d)    -> lm_head/kernel (transposed; absent when tied)
  <projection>.A.weight, .B.weight                 (r, in), (out, r) -> …/A, …/B (transposed): a factorized
                                                   export's low-rank matrix (`export.py`, config.json plrd_linears)
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from plrd_jax.io.output import check_writable, staged_directory
from plrd_jax.nn.config import DTYPES, ConfigError, LinearSpec, ModelConfig
from plrd_jax.nn.layout import unstack_layers
from plrd_jax.transforms.factorize import densify


class CheckpointError(ValueError):
    """A checkpoint (file, directory, tensor or tokenizer) that cannot be read as the model it claims to be."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF model types we read, and how each one's attention differs from LLaMA's.
MODEL_TYPES = {"llama": False, "mistral": False, "qwen2": True, "plrd_llama": False}  # model_type -> q/k/v bias
EXPORT_ARCHITECTURES = {False: ("LlamaForCausalLM", "llama"), True: ("Qwen2ForCausalLM", "qwen2")}
_HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


# ---- config ---------------------------------------------------------------------------------------
def dtype_name(dtype) -> str:
    """The name of a supported param / compute dtype ("float32", "bfloat16", ...); others are a CheckpointError."""
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return name


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"rope scaling type {kind!r} is not supported; only plain RoPE (rope_type "
                                  f"'default') is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], dtype=None) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json dict (llama, mistral, qwen2 model types)."""
    model_type = hf.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; expected one of {', '.join(MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("attention_bias / mlp_bias checkpoints are not supported; only Qwen2's q/k/v bias is")
    heads = hf["num_attention_heads"]
    max_seq_len = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window:  # within one window sliding-window attention is full attention
        max_seq_len = min(max_seq_len, window)
    name = dtype_name(dtype) if dtype is not None else "float32"
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=_rope_theta(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), max_seq_len=max_seq_len,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=MODEL_TYPES[model_type],
            param_dtype=name, dtype=name, bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")))
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"config.json describes no valid model: {e}") from None


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers' LlamaForCausalLM (Qwen2ForCausalLM with q/k/v bias) loads."""
    architecture, model_type = EXPORT_ARCHITECTURES[config.qkv_bias]
    hf = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim_, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "dtype": config.param_dtype, "torch_dtype": config.param_dtype,
    }
    if config.qkv_bias:
        hf.update(use_sliding_window=False, sliding_window=None)
    else:
        hf.update(attention_bias=False, mlp_bias=False)
    return hf


# ---- names and shapes -----------------------------------------------------------------------------
def hf_layout(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF tensor name -> (our param path, HF shape, transposed?) for every tensor a dense model holds."""
    d = config.hidden_size
    layout = {"model.embed_tokens.weight": (("embed", "embedding"), (config.vocab_size, d), False),
              "model.norm.weight": (("final_norm", "scale"), (d,), False)}
    for path in config.matrix_paths():
        d_in, d_out = config.matrix_shape(path)
        keys = tuple(path.split("/"))
        hf = "lm_head" if path == "lm_head" else f"model.layers.{keys[0][7:]}.{_HF_PROJ[keys[-1]]}"
        spec = config.linear(path)
        if spec.kind == "dense":
            layout[f"{hf}.weight"] = ((*keys, "kernel"), (d_out, d_in), True)
        else:  # factorized exports (io/modeling_plrd.py): A, B as (out, in) weights; sltrain's S as values + indices
            layout[f"{hf}.A.weight"] = ((*keys, "A"), (spec.rank, d_in), True)
            layout[f"{hf}.B.weight"] = ((*keys, "B"), (d_out, spec.rank), True)
            if spec.kind == "sltrain":
                layout[f"{hf}.sparse_values"] = ((*keys, "values"), (spec.nnz,), False)
                layout[f"{hf}.sparse_indices"] = ((*keys, "indices"), (spec.nnz,), False)
        if config.qkv_bias and keys[-1] in ("q", "k", "v"):
            layout[f"{hf}.bias"] = ((*keys, "bias"), (d_out,), False)
    for i in range(config.num_layers):
        layout[f"model.layers.{i}.input_layernorm.weight"] = ((f"layers_{i}", "attn_norm", "scale"), (d,), False)
        layout[f"model.layers.{i}.post_attention_layernorm.weight"] = (
            (f"layers_{i}", "mlp_norm", "scale"), (d,), False)
    return layout


def params_from_hf(tensors: Iterable[tuple[str, np.ndarray]], config: ModelConfig) -> dict:
    """Our params tree from (HF name, HF-layout array) pairs, consumed one at a time.

    Each array is checked against the shape `config` implies, transposed when it is a matrix, and cast to
    `config.param_dtype`; it is released before the next one is read.
    """
    layout = hf_layout(config)
    dtype = config.jnp_param_dtype
    params: dict = {}
    seen = set()
    for name, array in tensors:
        if name not in layout:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_embeddings):
                continue
            raise CheckpointError(f"unexpected tensor {name} {tuple(array.shape)}: not part of a "
                                  f"{config.num_layers}-layer {'Qwen2' if config.qkv_bias else 'LLaMA'} model")
        keys, shape, transposed = layout[name]
        if tuple(array.shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(array.shape)}; the config implies {shape}")
        node = params
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        integer = array.dtype.kind in "iu"  # sltrain's sparse indices stay int32
        node[keys[-1]] = jnp.asarray(array.T if transposed else array, dtype=jnp.int32 if integer else dtype)
        seen.add(name)
    missing = [name for name in layout if name not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]}{more}")
    return params


# ---- reading --------------------------------------------------------------------------------------
def read_json(file: str | os.PathLike) -> Any:
    """The JSON document in `file`; a file that is not UTF-8 JSON is a CheckpointError naming it."""
    file = Path(file)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def check_safetensors(file: str | os.PathLike) -> None:
    """Refuse a safetensors file that is empty, truncated or has no readable header, naming it (reads only the
    header, so a broken checkpoint fails before any tensor is loaded)."""
    file = Path(file)
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError(f"{file} is empty (0 bytes): the checkpoint was not written completely; "
                              f"export or download it again")
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise CheckpointError(f"{file} is truncated or corrupt ({size:,} bytes, shorter than its own header)")
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header)") from None
    if 8 + length + end > size:
        raise CheckpointError(f"{file} is truncated: {size:,} bytes where its header describes "
                              f"{8 + length + end:,}; export or download it again")


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF directory: `model.safetensors`, or the shards its index lists (each one's
    header checked: an empty or truncated file is an error naming it)."""
    path = Path(path)
    if (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        index = path / INDEX_FILE
        if not index.is_file():
            raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        document = read_json(index)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {index} is missing")
        files = [path / shard for shard in shards]
    for file in files:
        check_safetensors(file)
    return files


def read_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of the files, one tensor in memory at a time."""
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors' own error type is no ValueError
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file} cannot be read as safetensors: {e}") from None


def load_hf(path: str | os.PathLike, dtype=None) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF directory; params in `dtype` (default float32), also the compute dtype."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no Hugging Face checkpoint directory at {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    hf = read_json(config_file)
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    config = config_from_hf(hf, dtype)
    if hf.get("plrd_linears"):  # a factorized export: per-matrix kinds and ranks (plrd_jax.io.export)
        config = linears_from_hf(hf, config)
    return config, params_from_hf(read_safetensors(safetensors_files(path)), config)


# ---- writing --------------------------------------------------------------------------------------
def _dense(params, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Lowrank matrices multiplied out (K = A B); cola/sltrain linears have no dense equivalent from params alone."""
    for path, spec in config.linears:
        if spec.kind != "lowrank":
            raise CheckpointError(f"{path} is a {spec.kind} linear; only dense and lowrank matrices can be "
                                  f"exported as dense weights")
    return densify(params, config)


def hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named numpy arrays (weights (out, in)) of a dense params tree (either layout, `nn.layout.stack_layers`)."""
    params, out = unstack_layers(params), {}
    for name, (keys, shape, transposed) in hf_layout(config).items():
        node = params
        try:
            for key in keys:
                node = node[key]
        except KeyError:
            raise CheckpointError(f"params lack {'/'.join(keys)} (for {name})") from None
        array = np.asarray(node)
        out[name] = np.ascontiguousarray(array.T if transposed else array)
        if out[name].shape != shape:
            raise CheckpointError(f"param {'/'.join(keys)} has shape {array.shape}; the config implies "
                                  f"{shape[::-1] if transposed else shape}")
    return out


def save_hf(params, config: ModelConfig, out_dir: str | os.PathLike, tokenizer=None,
            overwrite: bool = False) -> Path:
    """Write a dense HF checkpoint (model.safetensors, config.json[, tokenizer files]) to `out_dir`.

    Lowrank matrices are multiplied out first. Files are written to a temporary sibling directory that is
    renamed into place at the end, so a failure leaves no partial checkpoint behind.
    """
    out = Path(out_dir)
    check_save_target(out, overwrite)
    params, config = _dense(unstack_layers(params), config.replace(scan_layers=False))
    with staged_directory(out) as tmp:
        save_file(hf_state_dict(params, config), str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def check_save_target(out_dir: str | os.PathLike, overwrite: bool = False, hint: str = "pass overwrite=True") -> None:
    """What `save_hf(..., out_dir, overwrite=overwrite)` would refuse, raised before any work: an existing
    `out_dir` without `overwrite` (the error says `hint`), a file or a non-checkpoint directory in its place, or a
    location this process cannot write."""
    out = Path(out_dir)
    if out.is_dir():
        if not overwrite:
            raise CheckpointError(f"{out} already exists; {hint} to replace it")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise CheckpointError(f"{out} is a directory but no Hugging Face checkpoint (no config.json); "
                                  f"refusing to replace it")
    elif out.exists():
        raise CheckpointError(f"{out} already exists and is a file, not a checkpoint directory")
    check_writable(out.parent if out.exists() else out)


# ---- per-matrix kinds and ranks in config.json (factorized exports) ----------------------------------------
EXPORTABLE_KINDS = ("lowrank", "sltrain")
_HF_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj")


def linears_to_hf(config: ModelConfig) -> dict[str, dict]:
    """config.json's `plrd_linears`: HF module name ("model.layers.0.mlp.up_proj", "lm_head") -> spec fields."""
    out = {}
    for name, (keys, _, _) in hf_layout(config).items():
        if keys[-1] == "A":
            spec = config.linear("/".join(keys[:-1]))
            fields = {"kind": spec.kind, "rank": spec.rank}
            if spec.kind == "sltrain":
                fields.update(nnz=spec.nnz, alpha=spec.alpha)
            out[name[: -len(".A.weight")]] = fields
    return out


def linears_from_hf(hf: dict[str, Any], config: ModelConfig) -> ModelConfig:
    """`config` with the per-matrix kinds and ranks of config.json's `plrd_linears` (the inverse of
    `linears_to_hf`); an unknown module or a malformed spec is a CheckpointError naming it."""
    linears = hf.get("plrd_linears")
    if not isinstance(linears, dict):
        raise CheckpointError("config.json's plrd_linears is not an object {module: {kind, rank, ...}}")
    specs = {}
    for module, fields in linears.items():
        m = _HF_MODULE.fullmatch(module)
        path = f"layers_{m[1]}/{'attn' if m[2] == 'self_attn' else 'mlp'}/{m[3]}" if m else None
        path = "lm_head" if module == "lm_head" else path
        if not path or not isinstance(fields, dict) or fields.get("kind") not in EXPORTABLE_KINDS:
            raise CheckpointError(f"config.json's plrd_linears entry {module!r}: {fields} is not a lowrank or "
                                  f"sltrain spec of a LLaMA projection")
        try:
            specs[path] = LinearSpec(fields["kind"], rank=fields.get("rank"), nnz=fields.get("nnz"),
                                     alpha=fields.get("alpha"))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"config.json's plrd_linears entry {module!r}: {e}") from None
    try:
        return config.with_linears(specs)  # re-runs the config's rank and shape checks
    except ConfigError as e:
        raise CheckpointError(f"config.json's plrd_linears: {e}") from None
