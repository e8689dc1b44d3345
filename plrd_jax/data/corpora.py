"""Text sources by name: local files, the shared corpora and their disjoint splits, Python docs, TFDS.

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

Tokens and windows: plrd_jax/data/windows.py; mixtures: plrd_jax/data/mixture.py.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence



class DataError(ValueError):
    """A text source or token window request that cannot be served."""


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
