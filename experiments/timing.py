"""The benchmark scripts' one timing helper."""
from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 5, warmup: int = 0) -> float:
    """Median wall time of `fn(*args)` over `repeats` calls, each waited for (`jax.block_until_ready` on its
    result; a function that returns None must wait itself), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
