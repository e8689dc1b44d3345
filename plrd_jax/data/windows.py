"""Token streams → packed, fixed-length windows [N, seq_len] in a deterministic, resumable order.

Tokens: the documents of a source are encoded one by one and joined by the tokenizer's `eos_token_id` (nothing
when it is None); no BOS is added. `pack` cuts the stream into non-overlapping windows [N, seq_len] and drops the
tail shorter than a window.

Order: with B windows per batch an epoch has N // B steps (the last N % B windows of each epoch's order are not
used). Epoch e visits the windows in the order `np.random.default_rng([seed, e]).permutation(N)`, or in file order
when seed is None; step k is the slice [i·B, (i+1)·B) of its epoch's order, i = k mod (N // B). `batch_at(k)`
computes it directly, so a resumed run starts at step k without replaying earlier steps.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding


from plrd_jax.data.corpora import DataError, load_documents
from plrd_jax.training.distributed import global_batch, process_rows


class Tokenizer(Protocol):
    """What the data pipeline needs of a tokenizer. `encode` must not add special tokens."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


# ---- tokens -------------------------------------------------------------------------------------
def encode(text: str, tokenizer: Tokenizer) -> np.ndarray:
    """tokenizer.encode(text) as int32 (a `tokenizers.Encoding` is read through its `.ids`)."""
    ids = tokenizer.encode(text)
    return np.asarray(getattr(ids, "ids", ids), dtype=np.int32).reshape(-1)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str | None:
    """A string identifying the tokenizer's vocabulary and rules: its `fingerprint` attribute, else the SHA-256
    of its (or its `.tokenizer`'s) `tokenizers` JSON; None when neither exists."""
    fp = getattr(tokenizer, "fingerprint", None)
    if fp is not None:
        return str(fp() if callable(fp) else fp)
    for obj in (tokenizer, getattr(tokenizer, "tokenizer", None), getattr(tokenizer, "backend_tokenizer", None)):
        if obj is not None and callable(getattr(obj, "to_str", None)):
            return hashlib.sha256(obj.to_str().encode()).hexdigest()
    return None


def tokenize(documents: str | Iterable[str], tokenizer: Tokenizer, cache_dir: str | Path | None = None
             ) -> np.ndarray:
    """Token stream (int32) of the documents, each encoded alone and joined by `eos_token_id` (when not None).

    With `cache_dir`, the stream is stored there as .npy keyed by the SHA-256 of the documents and the
    tokenizer's fingerprint, and read back on the next call.
    """
    docs = [documents] if isinstance(documents, str) else list(documents)
    eos = getattr(tokenizer, "eos_token_id", None)
    path = None
    if cache_dir is not None:
        tok_fp = tokenizer_fingerprint(tokenizer)
        if tok_fp is None:
            raise DataError(f"cannot cache tokens: tokenizer {type(tokenizer).__name__} has no fingerprint "
                            "(a `fingerprint` attribute or a `tokenizers` to_str())")
        key = hashlib.sha256(f"{tok_fp}|eos={eos}|{_documents_sha256(docs)}".encode()).hexdigest()
        path = Path(cache_dir) / f"tokens-{key[:32]}.npy"
        if path.is_file():
            return np.load(path)
    pieces = []
    for i, doc in enumerate(docs):
        if i and eos is not None:
            pieces.append(np.array([eos], np.int32))
        pieces.append(encode(doc, tokenizer))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, tokens)
        os.replace(tmp, path)
    return tokens


def _documents_sha256(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _check_seq_len(seq_len: int):
    if seq_len <= 1:
        raise DataError(f"seq_len {seq_len} must be at least 2 (a window predicts its tokens 1..seq_len-1)")


def pack(tokens: np.ndarray, seq_len: int, drop_last: bool = True) -> np.ndarray:
    """Non-overlapping windows [N, seq_len], N = len(tokens) // seq_len; window i is tokens[i·T:(i+1)·T].

    drop_last=False keeps the tail, padded with -1 to a full window.
    """
    _check_seq_len(seq_len)
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"{len(tokens)} tokens are fewer than one window of seq_len {seq_len}")
    windows = tokens[: n * seq_len].reshape(n, seq_len)
    if not drop_last and len(tokens) % seq_len:
        tail = np.full((1, seq_len), -1, np.int32)
        tail[0, : len(tokens) % seq_len] = tokens[n * seq_len:]
        windows = np.concatenate([windows, tail])
    return windows


def stream_windows(documents: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> Iterator[np.ndarray]:
    """Windows (seq_len,) packed on the fly from documents joined by EOS; the same windows `pack(tokenize(docs))`
    gives, without holding the whole stream."""
    _check_seq_len(seq_len)
    eos = getattr(tokenizer, "eos_token_id", None)
    buffer = np.zeros(0, np.int32)
    for i, doc in enumerate(documents):
        head = [np.array([eos], np.int32)] if i and eos is not None else []
        buffer = np.concatenate([buffer, *head, encode(doc, tokenizer)])
        n = len(buffer) // seq_len
        for j in range(n):
            yield buffer[j * seq_len:(j + 1) * seq_len]
        buffer = buffer[n * seq_len:]


# ---- order --------------------------------------------------------------------------------------
def steps_per_epoch(num_windows: int, batch_size: int) -> int:
    if batch_size < 1 or batch_size > num_windows:
        raise DataError(f"batch_size {batch_size} must be between 1 and the number of windows {num_windows}")
    return num_windows // batch_size


@functools.lru_cache(maxsize=4)
def window_order(num_windows: int, epoch: int, seed: int | None) -> np.ndarray:
    """The order in which epoch `epoch` visits the windows (module docstring)."""
    order = np.arange(num_windows) if seed is None else np.random.default_rng([seed, epoch]).permutation(num_windows)
    order.flags.writeable = False
    return order


def batch_indices(num_windows: int, step: int, batch_size: int, seed: int | None = None) -> np.ndarray:
    """Indices (batch_size,) of the windows in batch `step` (0-based, counted across epochs)."""
    if step < 0:
        raise DataError(f"step {step} must be >= 0")
    epoch, i = divmod(step, steps_per_epoch(num_windows, batch_size))
    return window_order(num_windows, epoch, seed)[i * batch_size:(i + 1) * batch_size]


def batch_at(windows: np.ndarray, step: int, batch_size: int, seed: int | None = None) -> np.ndarray:
    """Batch `step` [batch_size, seq_len] of the windows, computed directly (no replay)."""
    return windows[batch_indices(len(windows), step, batch_size, seed)]


def batches(windows: np.ndarray, batch_size: int, seed: int | None = None, start_step: int = 0,
            num_steps: int | None = None) -> Iterator[np.ndarray]:
    """batch_at(k) for k = start_step, start_step + 1, … (num_steps of them, or without end)."""
    steps = itertools.count(start_step) if num_steps is None else range(start_step, start_step + num_steps)
    for step in steps:
        yield batch_at(windows, step, batch_size, seed)


# ---- dataset ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """Packed windows [N, seq_len] of one source and `spec`, a JSON-able description for run metadata:
    source, seq_len, windows, tokens (N · seq_len), tokenizer (fingerprint), text_sha256 (of the source's
    documents; None for streamed sources), max_windows."""

    windows: np.ndarray
    spec: dict[str, Any]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    def __len__(self) -> int:
        return len(self.windows)

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(len(self.windows), batch_size)

    def batch_at(self, step: int, batch_size: int, seed: int | None = None) -> np.ndarray:
        return batch_at(self.windows, step, batch_size, seed)

    def batches(self, batch_size: int, seed: int | None = None, start_step: int = 0,
                num_steps: int | None = None) -> Iterator[np.ndarray]:
        return batches(self.windows, batch_size, seed, start_step, num_steps)


def load_dataset(source: str | os.PathLike, tokenizer: Tokenizer, seq_len: int, data_dir: str | Path | None = None,
                 text_field: str = "text", max_windows: int | None = None,
                 cache_dir: str | Path | None = None) -> TokenDataset:
    """Source `source` tokenized and packed into windows of `seq_len` (the first `max_windows` of them).

    Streamed (`tfds:`) sources need `max_windows`: only as many documents are read as fill that many windows.
    """
    source = os.fspath(source)  # a pathlib.Path names a local file like its string
    _check_seq_len(seq_len)
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows {max_windows} must be >= 1")
    if source.startswith("tfds:"):
        if max_windows is None:
            raise DataError(f"streamed source {source!r} needs max_windows (how many windows to read)")
        rows = list(itertools.islice(stream_windows(load_documents(source, data_dir, text_field), tokenizer,
                                                    seq_len), max_windows))
        if not rows:
            raise DataError(f"source {source!r} gave fewer tokens than one window of seq_len {seq_len}")
        windows, text_sha256 = np.stack(rows), None
    else:
        docs = list(load_documents(source, data_dir, text_field))
        windows = pack(tokenize(docs, tokenizer, cache_dir), seq_len)[:max_windows]
        text_sha256 = _documents_sha256(docs)
    spec = {"source": source, "seq_len": seq_len, "windows": len(windows), "tokens": int(windows.size),
            "tokenizer": tokenizer_fingerprint(tokenizer) or type(tokenizer).__name__,
            "text_sha256": text_sha256, "max_windows": max_windows}
    if text_field != "text":
        spec["text_field"] = text_field
    return TokenDataset(windows, spec)


class ProcessLocalData:
    """A `TokenDataset` view for multi-host healing: `batch_at(step, B, seed)` is the same global batch
    [B, T] as the dataset's, as a global array on `sharding`, each process reading only its own rows.

    `seq_len`, `windows`, `spec` and `len()` pass through, so it stands in for the dataset in `run_family`.
    """

    def __init__(self, dataset, sharding: NamedSharding):
        self.dataset = dataset
        self.sharding = sharding

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    @property
    def windows(self) -> np.ndarray:
        return self.dataset.windows

    @property
    def spec(self):
        return self.dataset.spec

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_at(self, step: int, batch_size: int, seed: int | None = None) -> jax.Array:
        shape = (batch_size, self.seq_len)
        rows = process_rows(self.sharding, shape)
        indices = batch_indices(len(self.dataset.windows), step, batch_size, seed)[rows]
        return global_batch(self.dataset.windows[indices], self.sharding, shape)
