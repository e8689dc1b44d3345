"""Calibration statistics on disk, read back one matrix at a time.

    save_stats(stats, directory)    {path: MatrixStats} -> one .npy file per matrix and field, plus index.json
    load_stats(directory)           -> a read-only mapping path -> MatrixStats of memory-mapped arrays

At 7B scale the statistics outweigh a layer: LLaMA-2-7B's Gram matrices XᵀX are 4096² (q, k, v, o, gate, up)
and 11008² (down) float32 per layer, 3.5 GB per layer with q/k/v and gate/up each holding their own copy. They
are accumulated sharded across devices (`calibrate`), written here one field at a time (each gathered to the
host alone), and a streamed decomposition (`plrd_jax.io.streaming.factorize_streamed`) then pages in the one
Gram matrix it is working on. The directory is staged: a failure leaves no half-written statistics.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from plrd_jax.io.output import staged_directory
from plrd_jax.transforms.calibrate import MatrixStats

INDEX = "index.json"


def _file(path: str, field: str) -> str:
    return f"{path.replace('/', '.')}.{field}.npy"


def save_stats(stats: Mapping[str, MatrixStats], directory: str | os.PathLike) -> None:
    """Write `stats` (numpy or jax arrays, sharded or not) to `directory`, replacing what was there."""
    with staged_directory(directory) as tmp:
        for path, s in stats.items():
            for field in MatrixStats._fields:
                np.save(tmp / _file(path, field), np.asarray(getattr(s, field), np.float32))
        (tmp / INDEX).write_text(json.dumps({"paths": list(stats), "fields": list(MatrixStats._fields)}))


class StatsFiles(Mapping):
    """path -> MatrixStats whose arrays are memory-mapped from `directory`: nothing is read until used."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{self.directory} holds no calibration statistics (no {INDEX}; "
                                    "write them with plrd_jax.io.stats.save_stats)")
        self.paths = json.loads(index.read_text())["paths"]

    def __getitem__(self, path: str) -> MatrixStats:
        if path not in self.paths:
            raise KeyError(path)
        return MatrixStats(*(np.load(self.directory / _file(path, f), mmap_mode="r") for f in MatrixStats._fields))

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def load_stats(directory: str | os.PathLike) -> StatsFiles:
    """The statistics `save_stats` wrote to `directory`, memory-mapped (see `StatsFiles`)."""
    return StatsFiles(directory)
