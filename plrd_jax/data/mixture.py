"""Weighted mixtures of sources, and the evaluation corpora of a run.

Mixtures (`parse_mixture`, `load_mixture`): `A=wa,B=wb,...` (weights default to 1) or a JSON file
`{"A": wa, ...}`; each source is packed on its own and the windows are interleaved by weight (`interleave`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


from plrd_jax.data.corpora import PARENT_SAMPLES, DataError
from plrd_jax.data.windows import TokenDataset, Tokenizer, load_dataset, tokenizer_fingerprint


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
