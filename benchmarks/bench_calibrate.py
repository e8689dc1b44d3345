"""Calibration of the embedded parent: wall time of `plrd_jax.transforms.calibrate.calibrate` over N windows of T tokens
of the healing half of WikiText-2, with and without the per-window Fisher pass.

    python benchmarks/bench_calibrate.py [--windows 32] [--seq-len 512] [--batch-size 4] [--no-fisher]
        [--json experiments/results/decompositions_bench_calibrate.json]

Reports the first call (trace + compile + run) and a second call (run only), tokens/s of the second, the CPU
seconds each used (all threads; on a machine shared with other jobs, CPU seconds / cores is what the call would
take with the cores to itself), and the size of the statistics. Set the CPU thread count with XLA_FLAGS / taskset as for any JAX run; the numbers in the
README were taken on 2 CPU cores shared with other jobs (the load average is recorded with them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np


def process_cpu_s() -> float:
    """CPU seconds used by this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext2-heal")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-fisher", action="store_true", help="skip the run with Fisher rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from plrd_jax.transforms.calibrate import calibrate
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.io.load import load_model

    config, params, tokenizer = load_model(args.model)
    data = load_dataset(args.data, tokenizer, args.seq_len, max_windows=args.windows)
    tokens = data.windows.size
    out = {"model": args.model, "data": data.spec, "batch_size": args.batch_size, "devices": str(jax.devices()),
           "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(), "runs": []}
    for fisher in ([False] if args.no_fisher else [False, True]):
        times, cpu = [], []
        for _ in range(2):
            t, c = time.perf_counter(), process_cpu_s()
            stats = calibrate(config, params, data.windows, args.batch_size, fisher=fisher)
            jax.block_until_ready(stats)
            times.append(time.perf_counter() - t)
            cpu.append(process_cpu_s() - c)
        size = sum(x.size for x in jax.tree.leaves(stats))
        run = {"fisher": fisher, "tokens": tokens, "first_call_s": round(times[0], 1),
               "second_call_s": round(times[1], 1), "tokens_per_s": round(tokens / times[1], 1),
               "first_call_cpu_s": round(cpu[0], 1), "second_call_cpu_s": round(cpu[1], 1),
               "matrices": len(stats), "stats_mib": round(size * 4 / 2 ** 20, 1),
               "load_average_after": [round(x, 1) for x in os.getloadavg()]}
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
