"""Training batches for a run from scratch: in-memory packed windows or a streamed source, both resumable, and
the tokenizer such a run uses.

WindowBatches: packed windows [N, T] in a seeded per-epoch order, batch k a pure function of k.
StreamedBatches: a streamed source such as `tfds:c4/en`, documents in file order cut into chunks of
`chunk_documents` documents, each chunk packed into windows and shuffled with rng([seed, chunk]); the position
(chunk, window) is saved with every checkpoint, so a resumed run skips documents without tokenizing them.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import numpy as np

from plrd_jax.data.corpora import DataError, load_documents
from plrd_jax.data.windows import batch_at, stream_windows


def load_tokenizer(spec: str):
    """(tokenizer, model vocab size) for an embedded model's name ("smollm2-135m"), an HF directory or
    tokenizer.json, or a Hugging Face hub name such as "t5-base" (downloaded; T5's vocabulary is used with
    GaLore's 32000 embedding rows, its 100 sentinel tokens never occurring in text)."""
    import os

    from plrd_jax.io.load import EMBEDDED, embedded_path
    from plrd_jax.io.tokenizer import Tokenizer

    if spec in EMBEDDED:
        from plrd_jax.io.gguf import open_gguf

        tokenizer = Tokenizer.from_gguf(open_gguf(embedded_path(spec)))
    elif os.path.exists(spec):
        tokenizer = Tokenizer.from_hf(spec)
    else:
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_pretrained(spec)
        except Exception as err:  # the hub is unreachable or the name unknown
            raise DataError(f"tokenizer {spec!r} is neither {', '.join(EMBEDDED)}, a local path, nor a "
                                f"reachable Hugging Face hub name ({type(err).__name__})") from None
        tokenizer = Tokenizer(backend, None, backend.token_to_id("</s>"))
    vocab = 32000 if spec.split("/")[-1].startswith("t5-") else tokenizer.vocab_size
    return tokenizer, vocab


class WindowBatches:
    """Batches of packed windows [N, T] held in memory: batch k is `data.batch_at(windows, k, B, seed)`."""

    def __init__(self, windows: np.ndarray, spec: dict | None = None, seed: int = 0):
        self.windows, self.seed = np.asarray(windows, np.int32), seed
        self.spec = {**(spec or {}), "order_seed": seed}

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    def batches(self, batch_size: int, start_step: int = 0, state=None) -> Iterator[tuple[np.ndarray, Any]]:
        for step in itertools.count(start_step):
            yield batch_at(self.windows, step, batch_size, self.seed), None


class StreamedBatches:
    """Batches from a streamed source (e.g. `tfds:c4/en`): chunk c is documents [c·D, (c+1)·D) in file order,
    packed into windows (EOS between documents, the tail shorter than a window dropped) and permuted by
    rng([seed, c]). The position after a batch, (chunk, window in chunk), comes with it; pass it back as
    `state` to resume (skipped documents are read, not tokenized)."""

    def __init__(self, source: str, tokenizer, seq_len: int, data_dir=None, seed: int = 42,
                 chunk_documents: int = 4096, text_field: str = "text"):
        self.source, self.tokenizer, self.seq_len, self.data_dir = source, tokenizer, seq_len, data_dir
        self.seed, self.chunk_documents, self.text_field = seed, chunk_documents, text_field
        self.spec = {"source": source, "seq_len": seq_len, "order_seed": seed, "chunk_documents": chunk_documents,
                     "streamed": True}

    def _chunks(self, first_chunk: int) -> Iterator[np.ndarray]:
        docs = iter(load_documents(self.source, self.data_dir, self.text_field))
        for _ in itertools.islice(docs, first_chunk * self.chunk_documents):
            pass
        for c in itertools.count(first_chunk):
            chunk = list(itertools.islice(docs, self.chunk_documents))
            if not chunk:
                return
            rows = list(stream_windows(chunk, self.tokenizer, self.seq_len))
            if rows:
                yield np.stack(rows)[np.random.default_rng([self.seed, c]).permutation(len(rows))]
            else:
                yield np.zeros((0, self.seq_len), np.int32)

    def batches(self, batch_size: int, start_step: int = 0, state=None) -> Iterator[tuple[np.ndarray, Any]]:
        if start_step and state is None:
            raise DataError("resuming a streamed source needs the saved stream position (state)")
        chunk, offset = (0, 0) if state is None else (int(state[0]), int(state[1]))
        pending: list[np.ndarray] = []
        for windows in self._chunks(chunk):
            windows = windows[offset:]
            while len(windows):
                take = batch_size - sum(len(p) for p in pending)
                pending.append(windows[:take])
                windows, offset = windows[take:], offset + min(take, len(windows))
                if sum(len(p) for p in pending) == batch_size:
                    yield np.concatenate(pending), [chunk, offset]
                    pending = []
            chunk, offset = chunk + 1, 0
        raise DataError(f"source {self.source!r} ran out of documents")
