"""The benchmark scripts' timing helpers."""
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
    """Worker of `process_round_robin`: build the step, then time one call per request until told to stop."""
    step = factory(*args)
    conn.send("ready")
    while conn.recv() == "run":
        start = time.perf_counter()
        step()
        conn.send(time.perf_counter() - start)


def process_round_robin(factories: dict, rounds: int, pause: float = 1.0) -> dict:
    """{name: median wall time} of steps that each live in a process of their own and take turns, one call per
    round. factories: {name: (factory, args)}, where the picklable `factory(*args)` builds the step (after its
    warm-up) and returns it as an argument-less function that waits for its own result.

    Separate processes keep one runtime's idle worker threads (XLA's and torch's pools both spin for a while
    after their work) from taking the cores from the other's turn, and each turn starts `pause` seconds after
    the previous one ended, when those threads have gone to sleep."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = {}

    def reply(name):
        try:
            return workers[name][1].recv()
        except EOFError:  # the worker died (its traceback is on stderr)
            raise RuntimeError(f"benchmark worker {name!r} failed") from None

    try:
        for name, (factory, args) in factories.items():  # built one after another: compilation has the cores
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve_steps, args=(child, factory, args), daemon=True)
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
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        for proc, conn in workers.values():
            if proc.is_alive():
                conn.send("stop")
            proc.join(timeout=60)
