"""Text sources → packed, fixed-length token windows in a deterministic order.

Sources, by name (`load_documents`):

  path.txt | path.jsonl | glob   local files in sorted path order; a .txt file is one document, each line of a
                                 .jsonl file one document (its `text_field`, default "text")
  pydoc                          Python's `pydoc_data.topics.topics`, topics joined by "\\n\\n" in sorted key order
  wikitext2-test                 the whole WikiText-2 raw test file, one document
  wikitext2-heal, wikitext2-eval its two halves by article (below)
  tinyshakespeare                tiny-shakespeare, one document
  books, books-heal, books-eval  six Project Gutenberg books (licence header and footer stripped) and their split
  speeches, speeches-heal,       124 US State of the Union and inaugural addresses and their split (below)
  speeches-eval
  tfds:<name>[:<split>]          a TensorFlow Datasets dataset (e.g. `tfds:c4/en`, split "train" by default),
                                 streamed in file order; `data_dir` is the TFDS data_dir (e.g. gs://bucket/tfds)
                                 and the dataset must already be prepared there

Files are read as UTF-8 with universal newlines ("\\r\\n" → "\\n", as Python's `open` does). The shared corpora
live in `$PLRD_SHARED_DATA` (default `<repo>/../shared/data`) and are checked against the SHA-256 of their
bytes listed in that folder's README before use. wiki.test.raw is stored with "\\r\\n"; read this way it is the
reference evaluation text (301,948 SmolLM2 tokens, no BOS).

WikiText-2 split by article: an article starts at a line ` = Title = ` (exactly one '=' on each side; the
sub-headings ` = = X = = ` do not start one) and runs to the next article start. With n articles in file order,
`wikitext2-heal` is the first n // 2 articles and `wikitext2-eval` the other n - n // 2, each its lines verbatim,
so heal + eval is the whole test text and the halves are disjoint by construction. wiki.test.raw has 62 articles:
31 + 31, with 153,986 + 147,962 of its 301,948 SmolLM2 tokens.

Books and speeches, split by construction: each book is cut at the first line break after 90 % of its
characters (`books-heal`: the heads, `books-eval`: the tails); the speeches, in file-name order (chronological
within each collection, state-of-the-union before inaugural), go to `speeches-eval` when their index is 4 mod 5
and to `speeches-heal` otherwise. So that a prefix of windows covers every document, each split is served as
`interleave_chunks` of its documents: chunks of at least 2,000 characters ending at a paragraph (or line) break,
taken round-robin across the documents, each chunk a document of its own.

Mixtures (`parse_mixture`, `load_mixture`): `A=wa,B=wb,...` (weights default to 1) or a JSON file
`{"A": wa, ...}`; each source is packed on its own and the windows are interleaved by weight (`interleave`).

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
import glob as globlib
import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np


class DataError(ValueError):
    """A text source or token window request that cannot be served."""


class Tokenizer(Protocol):
    """What the data pipeline needs of a tokenizer. `encode` must not add special tokens."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...


# Shared corpora: name -> (path inside the shared data folder, SHA-256 of its bytes from the folder's README).
SHARED_FILES = {
    "wikitext2-test": ("wikitext-2-raw/wiki.test.raw",
                       "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"),
    "tinyshakespeare": ("tinyshakespeare/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
# Multi-file corpora: folder -> {file: SHA-256} (books, one file each) or {subfolder: SHA-256 over the sorted
# files, each its name's UTF-8 bytes then its content} (speeches), from the shared folder's README.
BOOKS = {
    "austen-pride-and-prejudice.txt": "0d1b2bf2e50f92b8b0be8b1a2588e815272a3cf7059422d26344ad77cbeb7068",
    "doyle-sherlock-holmes.txt": "1623a1c3729c48210f3f7de69e840948e0e4caf4506bd78bc3ca1850a47a3efd",
    "hamilton-madison-jay-federalist.txt": "8f5c908f36ba17b959ea83ec79764fa1e3835a4dd5fe28549096647268b0cb2a",
    "melville-moby-dick.txt": "53b44c609f74f283ae062e3ec46ab29e64d208d4c42b66564b1d53900da364c8",
    "shelley-frankenstein.txt": "81ed9a92e5356238bf1415351b0df9958440296321645a3e4d1614ee0e656116",
    "smith-wealth-of-nations.txt": "0adec97745dad038c347299d7996f1ffb1af1727f9392097c560c7c07362f6f8",
}
SPEECHES = {
    "state-of-the-union": "26753bf8b9284810fa75fb383e37e6dbcadba8d3bd503f0f347eb4135f7cbf84",
    "inaugural": "a8b09c43fcab9c99e9764a6341cd45a95f7a8f24d361479612ad324bf609158b",
}
BOOK_EVAL_FRACTION = 0.1  # the tail of each book held out
SPEECH_EVAL_EVERY = 5  # every 5th speech held out
CHUNK_CHARS = 2000
PARENT_SAMPLES = "parent-samples"  # a mixture source: windows the parent writes itself (not text on disk)
NAMED_SOURCES = ("pydoc", "tinyshakespeare", "wikitext2-test", "wikitext2-heal", "wikitext2-eval",
                 "books", "books-heal", "books-eval", "speeches", "speeches-heal", "speeches-eval")
FILE_SUFFIXES = (".txt", ".jsonl")
ARTICLE_START = re.compile(r" = [^=](?:.*[^=])? = ")


# ---- sources ------------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """The shared data folder: `$PLRD_SHARED_DATA`, else `<repo>/../shared/data`."""
    env = os.environ.get("PLRD_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_shared(name: str, data_dir: str | Path | None = None) -> str:
    """The text of shared corpus `name` (see `SHARED_FILES`) after checking its SHA-256."""
    folder = _shared_folder(data_dir)
    rel, want = SHARED_FILES[name]
    path = folder / rel
    if not path.is_file():
        raise DataError(f"source {name!r}: file {path} not found in the shared data folder")
    got = sha256_file(path)
    if got != want:
        raise DataError(f"{path}: SHA-256 {got} does not match {want} (shared/data/README.md); "
                        "the copy is corrupted or a different version")
    return _read_text(path)


def _shared_folder(data_dir) -> Path:
    folder = Path(data_dir) if data_dir is not None else shared_data_dir()
    if not folder.is_dir():
        raise DataError(f"shared data folder {folder} not found; set PLRD_SHARED_DATA to the folder holding "
                        "wikitext-2-raw/, tinyshakespeare/, books/ and speeches/")
    return folder


def gutenberg_body(text: str) -> str:
    """The text between a Project Gutenberg file's `*** START OF` and `*** END OF` lines (both dropped)."""
    start = re.search(r"^\*\*\* START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* END OF.*$", text, re.M)
    if not start or not end or end.start() < start.end():
        raise DataError("not a Project Gutenberg text: no '*** START OF' / '*** END OF' lines")
    return text[start.end():end.start()].strip("\n") + "\n"


def read_books(data_dir: str | Path | None = None) -> list[str]:
    """The six books' bodies (`gutenberg_body`), in file-name order, each checked against its SHA-256."""
    folder = _shared_folder(data_dir) / "books"
    docs = []
    for name, want in sorted(BOOKS.items()):
        path = folder / name
        if not path.is_file():
            raise DataError(f"source 'books': file {path} not found in the shared data folder")
        if sha256_file(path) != want:
            raise DataError(f"{path}: SHA-256 does not match {want} (shared/data/README.md)")
        docs.append(gutenberg_body(_read_text(path)))
    return docs


def read_speeches(data_dir: str | Path | None = None) -> list[str]:
    """Every speech, state-of-the-union then inaugural, each collection in file-name order and checked
    against its SHA-256 (module docstring)."""
    root = _shared_folder(data_dir) / "speeches"
    docs = []
    for sub in ("state-of-the-union", "inaugural"):
        folder = root / sub
        if not folder.is_dir():
            raise DataError(f"source 'speeches': folder {folder} not found in the shared data folder")
        h = hashlib.sha256()
        for path in sorted(folder.iterdir(), key=lambda p: p.name):
            h.update(path.name.encode())
            h.update(path.read_bytes())
            docs.append(_read_text(path))
        if h.hexdigest() != SPEECHES[sub]:
            raise DataError(f"{folder}: SHA-256 over its files does not match {SPEECHES[sub]} (shared/data/README.md)")
    return docs


def split_at_line(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) of `text` cut at the first line break at or after `fraction` of its characters."""
    cut = text.find("\n", int(len(text) * fraction))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def interleave_chunks(docs: Sequence[str], chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Each document cut into chunks of at least `chunk_chars` characters that end at a paragraph break
    ("\\n\\n") when one comes within 4 × chunk_chars, else at a line break; then chunk 0 of every document,
    chunk 1 of every document, ... The chunks, joined in document order, are the documents again."""
    pieces = []
    for doc in docs:
        chunks, start = [], 0
        while start < len(doc):
            stop, width = doc.find("\n\n", start + chunk_chars), 2
            if stop < 0 or stop - start > 4 * chunk_chars:
                stop, width = doc.find("\n", start + chunk_chars), 1
            stop = len(doc) if stop < 0 else stop + width
            chunks.append(doc[start:stop])
            start = stop
        pieces.append(chunks)
    return [chunks[i] for i in range(max(map(len, pieces), default=0)) for chunks in pieces if i < len(chunks)]


def _split_source(name: str, data_dir) -> list[str]:
    """Documents of books / speeches and their -heal / -eval splits (module docstring)."""
    base, _, part = name.partition("-")
    if base == "books":
        docs = read_books(data_dir)
        if part:
            docs = [split_at_line(d, 1 - BOOK_EVAL_FRACTION)[part == "eval"] for d in docs]
    else:
        docs = read_speeches(data_dir)
        if part:
            held = [i % SPEECH_EVAL_EVERY == SPEECH_EVAL_EVERY - 1 for i in range(len(docs))]
            docs = [d for d, h in zip(docs, held) if h == (part == "eval")]
    return interleave_chunks(docs)


def domain_of(source: str) -> str:
    """The domain a source belongs to: its name (a file's without its .txt / .jsonl suffix) without a -heal /
    -eval / -test split suffix, so that `books-heal` and `books-eval`, or `x-heal.txt` and `x-eval.txt`, share
    one. An evaluation corpus whose domain no calibration or healing source has is reported as unseen."""
    for suffix in FILE_SUFFIXES:
        source = source.removesuffix(suffix)
    return re.sub(r"-(heal|eval|test)$", "", source)


def wikitext_articles(text: str) -> list[str]:
    """WikiText text split at article starts (lines ` = Title = `); lines before the first go with it."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if ARTICLE_START.fullmatch(line.rstrip("\r\n"))]
    if not starts:
        return [text] if text else []
    starts[0] = 0
    return ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def wikitext_halves(text: str) -> tuple[str, str]:
    """(heal, eval): the first n // 2 articles and the other n - n // 2; heal + eval == text."""
    articles = wikitext_articles(text)
    half = len(articles) // 2
    return "".join(articles[:half]), "".join(articles[half:])


def load_documents(name: str, data_dir: str | Path | None = None, text_field: str = "text") -> Iterable[str]:
    """The documents of source `name` (module docstring): a list, or for `tfds:` sources a lazy iterator."""
    if name.startswith("tfds:"):
        return _tfds_documents(name, data_dir, text_field)
    if name == "pydoc":
        from pydoc_data.topics import topics
        docs = ["\n\n".join(topics[k] for k in sorted(topics))]
    elif name in SHARED_FILES:
        docs = [read_shared(name, data_dir)]
    elif domain_of(name) in ("books", "speeches") and name in NAMED_SOURCES:
        docs = _split_source(name, data_dir)
    elif name in ("wikitext2-heal", "wikitext2-eval"):
        heal, evaluation = wikitext_halves(read_shared("wikitext2-test", data_dir))
        docs = [heal if name == "wikitext2-heal" else evaluation]
    elif _looks_like_path(name):
        docs = [doc for path in _file_paths(name) for doc in _file_documents(path, text_field)]
    else:
        raise DataError(f"unknown source {name!r}; known: {', '.join(NAMED_SOURCES)}, tfds:<name>[:<split>], "
                        f"or a path or glob of {'/'.join(FILE_SUFFIXES)} files")
    if not any(doc.strip() for doc in docs):
        raise DataError(f"source {name!r} has no text")
    return docs


def load_text(name: str, data_dir: str | Path | None = None, text_field: str = "text") -> str:
    """The documents of a non-streamed source joined by "\\n\\n" (one document: its text)."""
    if name.startswith("tfds:"):
        raise DataError(f"source {name!r} is streamed; use load_documents or load_dataset(max_windows=...)")
    return "\n\n".join(load_documents(name, data_dir, text_field))


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") from None


def _looks_like_path(name: str) -> bool:
    return any(c in name for c in "*?[/" + os.sep) or name.endswith(FILE_SUFFIXES) or os.path.exists(name)


def _file_paths(pattern: str) -> list[Path]:
    pattern = os.path.expanduser(pattern)
    if any(c in pattern for c in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"no files match {pattern!r}")
    else:
        paths = [Path(pattern)]
        if not paths[0].is_file():
            raise DataError(f"file {pattern} not found")
    for path in paths:
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected {' or '.join(FILE_SUFFIXES)}")
    return paths


def _file_documents(path: Path, text_field: str) -> list[str]:
    text = _read_text(path)
    if path.suffix == ".txt":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (has: {fields})")
        docs.append(str(record[text_field]))
    return docs


def _tfds_documents(name: str, data_dir, text_field: str) -> Iterator[str]:
    """`tfds:<name>[:<version>][:<split>]` → the `text_field` of each example, in file order."""
    parts = name[len("tfds:"):].split(":")
    split = "train"
    if len(parts) > 1 and not re.fullmatch(r"[\d.]+", parts[-1]):
        split = parts.pop()
    dataset = ":".join(parts)
    if not dataset:
        raise DataError(f"source {name!r} names no dataset; expected tfds:<name>[:<split>], e.g. tfds:c4/en")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"source {name!r} needs tensorflow_datasets: pip install tensorflow tensorflow-datasets"
                        ) from None
    ds = tfds.load(dataset, split=split, data_dir=None if data_dir is None else str(data_dir),
                   shuffle_files=False, download=False)

    def texts():
        for example in tfds.as_numpy(ds):
            text = example[text_field]
            yield text.decode("utf-8") if isinstance(text, bytes) else str(text)

    return texts()


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


def load_dataset(source: str, tokenizer: Tokenizer, seq_len: int, data_dir: str | Path | None = None,
                 text_field: str = "text", max_windows: int | None = None,
                 cache_dir: str | Path | None = None) -> TokenDataset:
    """Source `source` tokenized and packed into windows of `seq_len` (the first `max_windows` of them).

    Streamed (`tfds:`) sources need `max_windows`: only as many documents are read as fill that many windows.
    """
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


# ---- mixtures and evaluation corpora ------------------------------------------------------------
def parse_mixture(spec: str | Mapping[str, float]) -> dict[str, float]:
    """`A=wa,B=wb,...` (a weight defaults to 1), a JSON file `{"A": wa, ...}`, or a mapping → {source: weight},
    weights positive (not normalized)."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif spec.endswith(".json") and os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                loaded = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"mixture file {spec} is not UTF-8 JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise DataError(f"mixture file {spec}: expected a JSON object {{source: weight}}")
        items = list(loaded.items())
    else:
        items = []
        for part in spec.split(","):
            name, sep, weight = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
            try:
                items.append((name.strip(), float(weight)))
            except ValueError:
                raise DataError(f"mixture {spec!r}: weight {weight!r} of {name!r} is not a number") from None
    out: dict[str, float] = {}
    for name, weight in items:
        if not name:
            raise DataError(f"mixture {spec!r} has an empty source name")
        if name in out:
            raise DataError(f"mixture {spec!r} names {name!r} twice")
        if not float(weight) > 0:
            raise DataError(f"mixture {spec!r}: weight of {name!r} must be positive, got {weight}")
        out[name] = float(weight)
    if not out:
        raise DataError(f"mixture {spec!r} names no source")
    return out


def interleave(counts: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Deterministic weighted interleaving: source i's k-th item is due at time (k + 1) / w_i; items are taken in
    order of due time (ties: lower i first) until some source would need an item beyond its count.
    Returns the source index of each position; the share of source i tends to w_i / Σ w."""
    times, owners = [], []
    horizon = min((n + 1) / w for n, w in zip(counts, weights))
    for i, (n, w) in enumerate(zip(counts, weights)):
        t = (np.arange(n) + 1) / w
        t = t[t < horizon]
        times.append(t)
        owners.append(np.full(len(t), i))
    times, owners = np.concatenate(times), np.concatenate(owners)
    order = np.lexsort((owners, times))
    return owners[order]


def sampled_share(spec: str | Mapping[str, float], windows: int) -> int:
    """How many `PARENT_SAMPLES` windows a mixture of `windows` windows draws (0 when it names none)."""
    sources = parse_mixture(spec)
    if PARENT_SAMPLES not in sources:
        return 0
    return math.ceil(windows * sources[PARENT_SAMPLES] / sum(sources.values())) + 1


def load_mixture(spec: str | Mapping[str, float], tokenizer: Tokenizer, seq_len: int,
                 data_dir: str | Path | None = None, max_windows: int | None = None,
                 cache_dir: str | Path | None = None, samples: np.ndarray | None = None) -> TokenDataset:
    """A weighted mixture of sources (`parse_mixture`) as one TokenDataset: each source packed on its own into
    windows of `seq_len`, the windows interleaved by weight (`interleave`), the first `max_windows` kept.
    A single unweighted source gives exactly `load_dataset(source)`. Streamed (`tfds:`) components need
    max_windows; each then reads at most that many windows. The source `parent-samples` is not text: its
    windows are `samples` [N, seq_len] (the parent's own sampled tokens, `generate.sample_windows`)."""
    sources = parse_mixture(spec)
    if (PARENT_SAMPLES in sources) != (samples is not None):
        raise DataError(f"mixture {spec!r}: the {PARENT_SAMPLES!r} source and `samples` go together")
    if len(sources) == 1 and next(iter(sources.values())) == 1.0 and samples is None:
        return load_dataset(next(iter(sources)), tokenizer, seq_len, data_dir, max_windows=max_windows,
                            cache_dir=cache_dir)

    def part(name):
        if name == PARENT_SAMPLES:
            windows = np.asarray(samples, np.int32)
            if windows.ndim != 2 or windows.shape[1] != seq_len:
                raise DataError(f"{PARENT_SAMPLES}: windows of shape {windows.shape}, expected [N, {seq_len}]")
            return TokenDataset(windows, {"source": name, "seq_len": seq_len, "windows": len(windows),
                                          "tokens": int(windows.size),
                                          "tokens_sha256": hashlib.sha256(windows.tobytes()).hexdigest()})
        return load_dataset(name, tokenizer, seq_len, data_dir, max_windows=max_windows if name.startswith("tfds:")
                            else None, cache_dir=cache_dir)

    parts = [part(name) for name in sources]
    owners = interleave([len(p) for p in parts], list(sources.values()))[:max_windows]
    taken = [0] * len(parts)
    rows = []
    for i in owners:
        rows.append(parts[i].windows[taken[i]])
        taken[i] += 1
    windows = np.stack(rows)
    spec_out = {"source": ",".join(f"{n}={w:g}" for n, w in sources.items()), "seq_len": seq_len,
                "windows": len(windows), "tokens": int(windows.size),
                "tokenizer": tokenizer_fingerprint(tokenizer) or type(tokenizer).__name__,
                "components": [{**p.spec, "weight": w, "windows_used": n}
                               for p, w, n in zip(parts, sources.values(), taken)],
                "max_windows": max_windows}
    return TokenDataset(windows, spec_out)


def load_corpora(names: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int,
                 data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> dict[str, TokenDataset]:
    """Evaluation corpora: each source (comma-separated names or a list) → the first ceil(max_tokens / seq_len)
    windows of it. A corpus shorter than one window is an error naming it."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    if not names or any(not n for n in names):
        raise DataError(f"evaluation corpora {names!r}: give comma-separated source names")
    if len(set(names)) != len(names):
        raise DataError(f"evaluation corpora {','.join(names)} name a corpus twice")
    out = {}
    for name in names:
        try:
            out[name] = load_dataset(name, tokenizer, seq_len, data_dir, max_windows=-(-max_tokens // seq_len),
                                     cache_dir=cache_dir)
        except DataError as err:
            raise DataError(f"evaluation corpus {name!r}: {err}") from None
    return out


def _long_lines(name: str, data_dir, min_chars: int = 30) -> set[int]:
    return {hash(line) for doc in load_documents(name, data_dir) for line in
            (x.strip() for x in doc.splitlines()) if len(line) >= min_chars}


def check_disjoint(eval_names: Iterable[str], train_names: Iterable[str], data_dir: str | Path | None = None,
                   max_shared: float = 0.02) -> None:
    """Refuse an evaluation corpus that shares text with the calibration / healing sources: more than
    `max_shared` of its lines of ≥ 30 characters also occur in them (a few stock phrases — "God bless America",
    "To the People of the State of New York:" — recur across documents of one domain, so the bound is not 0).
    Streamed (`tfds:`) sources are not checked."""
    train = [n for n in train_names if not n.startswith("tfds:") and n != PARENT_SAMPLES]
    if not train:
        return
    seen: set[int] = set()
    for name in train:
        seen |= _long_lines(name, data_dir)
    for name in eval_names:
        if name.startswith("tfds:"):
            continue
        if name in train:
            raise DataError(f"evaluation corpus {name!r} is also calibration / healing text; evaluate on a disjoint "
                            "split (e.g. wikitext2-eval beside wikitext2-heal)")
        lines = _long_lines(name, data_dir)
        shared = len(lines & seen) / max(len(lines), 1)
        if shared > max_shared:
            raise DataError(f"evaluation corpus {name!r} overlaps the calibration / healing text ({100 * shared:.0f} % "
                            f"of its lines occur there: {', '.join(train)}); evaluate on a disjoint split")
