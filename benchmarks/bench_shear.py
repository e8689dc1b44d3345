"""The pruning step's throughput against the plain heal step, in one run (the masks' overhead; target ≤ 1.3×).

    python benchmarks/bench_shear.py [--model smollm2-135m] [--batch 4] [--seq-len 256] [--steps 5]
        [--target 22,480,6,2,1344] [--dtype float32] [--out experiments/results]

Both steps train the same parent on the same batches (grad_accum 1): the heal step is plrd_jax.training.step's
(AdamW, clip, cross-entropy); the pruning step adds one hard-concrete sample of every mask, the masked forward
and backward, the Lagrangian and the log α / λ updates (plrd_jax.methods.l0_pruning.make_prune_step). Steps alternate
(heal, prune, heal, …) after one compile step each, so that load on a shared machine hits both alike; the
median step time of each is reported. Writes shear_bench.json and shear_bench.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--target", default="22,480,6,2,1344", help="LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    import plrd_jax.nn.masks as M
    from plrd_jax.io.load import load_model
    from plrd_jax.methods.l0_pruning import L0Config, init_prune_state, make_prune_step
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.optim import HealConfig
    from plrd_jax.training.state import init_train_state
    from plrd_jax.training.step import make_heal_step

    config, params, _ = load_model(args.model)
    layers, hidden, heads, kv, inter = (int(x) for x in args.target.split(","))
    target = M.TargetShape(layers, hidden, heads, inter, kv).resolve(config)
    mesh = make_mesh()
    shardings = param_shardings(params, mesh)
    total = args.steps + 1
    heal = HealConfig(lr=1e-4, warmup_steps=0, total_steps=total, dtype=args.dtype)
    l0 = L0Config()
    rng = np.random.default_rng(0)
    batches = rng.integers(0, config.vocab_size, (total, 1, args.batch, args.seq_len)).astype(np.int32)

    heal_state = init_train_state(params, heal, mesh, shardings)
    heal_step = make_heal_step(config, heal, mesh, shardings)
    prune_state = init_prune_state(params, config, heal, l0, mesh, shardings)
    prune_step = make_prune_step(config, target, heal, l0, mesh, shardings, total_steps=total)
    del params

    times = {"heal": [], "prune": []}
    for i in range(total):
        t = time.perf_counter()
        heal_state, metrics = heal_step(heal_state, batches[i], None)
        jax.block_until_ready(metrics)
        if i:
            times["heal"].append(time.perf_counter() - t)
        t = time.perf_counter()
        prune_state, metrics = prune_step(prune_state, batches[i], None)
        jax.block_until_ready(metrics)
        if i:
            times["prune"].append(time.perf_counter() - t)
    tokens = args.batch * args.seq_len
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, "dtype": args.dtype,
              "target": target.to_dict(), "steps_timed": args.steps, "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind), "machine": platform.processor() or platform.machine(),
              "heal_step_s": median["heal"], "prune_step_s": median["prune"],
              "heal_tokens_per_s": tokens / median["heal"], "prune_tokens_per_s": tokens / median["prune"],
              "overhead": median["prune"] / median["heal"], "all_times_s": times}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shear_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = (f"| step | median s | tokens/s |\n|---|---|---|\n"
          f"| heal (plain) | {median['heal']:.3f} | {result['heal_tokens_per_s']:.0f} |\n"
          f"| pruning (masks + Lagrangian) | {median['prune']:.3f} | {result['prune_tokens_per_s']:.0f} |\n\n"
          f"Overhead {result['overhead']:.2f}× ({args.model}, batch {args.batch} × {args.seq_len}, {args.dtype}, "
          f"{result['backend']} {result['device']}, median of {args.steps} alternating steps after compile).\n")
    with open(os.path.join(args.out, "shear_bench.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
