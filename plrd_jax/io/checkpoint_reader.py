"""A safetensors checkpoint read one tensor at a time, from its byte offset: what the streamed (bounded host
memory) transforms read. The safetensors package's numpy reader has no bfloat16; this one maps BF16 to
ml_dtypes.bfloat16."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path



import ml_dtypes
import numpy as np

from plrd_jax.nn.config import ModelConfig
from plrd_jax.io.hf import CheckpointError, config_from_hf, hf_layout, safetensors_files

# safetensors dtype names -> numpy dtypes
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors name, e.g. "F16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """name -> where its bytes lie, from a safetensors file's JSON header (no tensor data is read)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is too short to be a safetensors file")
        size = int.from_bytes(raw, "little")
        if size > 100_000_000:
            raise CheckpointError(f"{file} has an implausible header size {size}: not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise CheckpointError(f"{file} has no valid safetensors JSON header") from None
    base = 8 + size
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise CheckpointError(f"tensor {name} in {file.name} has dtype {info['dtype']}, not one of "
                                  f"{', '.join(ST_DTYPES)}")
        start, stop = info["data_offsets"]
        entries[name] = TensorEntry(file, info["dtype"], tuple(info["shape"]), base + start, base + stop)
    return entries


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """One tensor, read into a fresh array (one copy, in its stored dtype)."""
    dtype = np.dtype(ST_DTYPES[entry.dtype])
    count = int(np.prod(entry.shape, dtype=np.int64))
    if count * dtype.itemsize != entry.stop - entry.start:
        raise CheckpointError(f"{entry.file.name}: a {entry.dtype} tensor of shape {entry.shape} cannot span "
                              f"{entry.stop - entry.start} bytes")
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        array = np.fromfile(f, dtype=dtype, count=count)
    if array.size != count:
        raise CheckpointError(f"{entry.file} ends inside a tensor (truncated file)")
    return array.reshape(entry.shape)


@dataclasses.dataclass(frozen=True)
class StreamedCheckpoint:
    """An HF checkpoint opened for streaming: its config and where each tensor our layout needs lies."""

    directory: Path
    config: ModelConfig
    tensors: dict[str, TensorEntry]  # HF name -> entry, for every tensor of `hf_layout(config)`

    def read(self, name: str, dtype=None) -> tuple[tuple[str, ...], np.ndarray]:
        """(our param path, array) of HF tensor `name`: a matrix transposed to (d_in, d_out), in `dtype`
        (default the config's param dtype; "stored" keeps the file's). Only the returned array stays in memory."""
        keys, _, transposed = hf_layout(self.config)[name]
        array = read_tensor(self.tensors[name])
        if dtype == "stored":
            dtype = array.dtype
        dtype = np.dtype(self.config.jnp_param_dtype if dtype is None else dtype)
        return keys, np.ascontiguousarray(array.T if transposed else array, dtype=dtype)

    def params(self, dtype=None) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        """(our param path, array) for every tensor, read one at a time."""
        for name in hf_layout(self.config):
            yield self.read(name, dtype)


def open_checkpoint(path: str | os.PathLike, dtype=None) -> StreamedCheckpoint:
    """Read config.json, the shard index and every shard's header; check every shard and tensor is there.

    CheckpointError (one line) for a missing config, a shard listed in the index but absent, a tensor the
    index places in a shard that lacks it, or a tensor missing or of the wrong shape.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no Hugging Face checkpoint directory at {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json")
    config = config_from_hf(json.loads((path / "config.json").read_text()), dtype)
    files = safetensors_files(path)  # raises for a shard the index lists but that is missing
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        tensors.update(read_header(file))
    index = path / "model.safetensors.index.json"
    if len(files) > 1 or not (path / "model.safetensors").is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in tensors or tensors[name].file.name != shard:
                raise CheckpointError(f"{index.name} places {name} in {shard}, which does not hold it")
    for name, (_, shape, _) in hf_layout(config).items():
        if name not in tensors:
            raise CheckpointError(f"checkpoint {path} lacks tensor {name}")
        if tensors[name].shape != shape:
            raise CheckpointError(f"tensor {name} has shape {tensors[name].shape}; the config implies {shape}")
    return StreamedCheckpoint(path, config, tensors)
