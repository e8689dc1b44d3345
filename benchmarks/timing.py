"""The benchmark scripts' timing helpers."""
from __future__ import annotations

import os
import statistics
import sys
import time

import jax

# glibc malloc keeping freed memory (the CLI's setting, `plrd_jax.cli.keep_freed_memory`). A virtual machine with
# free page reporting (this one: `page_reporting.page_reporting_order=11` in /proc/cmdline) hands pages freed to
# the kernel back to its host, and touching them again costs up to 8 µs a page, against about 0.5 µs for a page
# the kernel kept. Without these settings a heal step frees and touches again 1.4-2.4 GB of buffers and a forward
# its 200 MB of logits, and their times depend on what the host did in between.
from plrd_jax.cli import KEEP_FREED_MEMORY  # noqa: E402


def keep_freed_memory() -> None:
    """Restart this script once with GLIBC_TUNABLES=KEEP_FREED_MEMORY (read only at start-up), for it and the
    workers it spawns. Call it first thing in main(). Does nothing off Linux or when GLIBC_TUNABLES is already
    set: set it to '' to time with glibc's defaults."""
    if sys.platform == "linux" and sys.executable and "GLIBC_TUNABLES" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**os.environ, "GLIBC_TUNABLES": KEEP_FREED_MEMORY})


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


def round_robin_medians(fns: dict, rounds: int) -> dict:
    """{name: median wall time} of argument-less functions called in turn, one call each per round, so that a
    slow spell of the machine hits all of them alike. Each call must wait for its own result."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _serve_steps(conn, factory, args):
    """Worker of `process_round_robin`: build the step, then time one call per request until told to stop,
    answering (seconds, minor page faults)."""
    import resource

    step = factory(*args)
    conn.send("ready")
    while conn.recv() == "run":
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        conn.send((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))


def process_round_robin(factories: dict, rounds: int, pause: float = 1.0) -> dict:
    """{name: (median wall time, median minor page faults)} of steps that each live in a process of their own
    and take turns, one call per round. factories: {name: (factory, args)} or {name: (factory, args, tunables)},
    where the picklable `factory(*args)` builds the step (after its warm-up) and returns it as an argument-less
    function that waits for its own result, and `tunables`, when given, is that worker's GLIBC_TUNABLES ('' for
    glibc's defaults; otherwise the worker has this process's).

    Separate processes keep one runtime's idle worker threads (XLA's and torch's pools both spin for a while
    after their work) from taking the cores from the other's turn, and each turn starts `pause` seconds after
    the previous one ended, when those threads have gone to sleep."""
    import multiprocessing
    from unittest import mock

    ctx = multiprocessing.get_context("spawn")
    workers = {}

    def reply(name):
        try:
            return workers[name][1].recv()
        except EOFError:  # the worker died (its traceback is on stderr)
            raise RuntimeError(f"benchmark worker {name!r} failed") from None

    try:
        for name, (factory, args, *tunables) in factories.items():  # one after another: compiling has the cores
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve_steps, args=(child, factory, args), daemon=True)
            # GLIBC_TUNABLES is read by the spawned interpreter at start-up
            with mock.patch.dict(os.environ, {"GLIBC_TUNABLES": tunables[0]} if tunables else {}):
                proc.start()
            child.close()  # only the worker holds its end, so its death ends our recv
            workers[name] = (proc, parent)
            reply(name)
        times = {name: [] for name in factories}
        for _ in range(rounds):
            for name, (_, conn) in workers.items():
                time.sleep(pause)
                conn.send("run")
                times[name].append(reply(name))
        return {name: tuple(statistics.median(column) for column in zip(*t)) for name, t in times.items()}
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                conn.send("stop")
            proc.join(timeout=60)
