"""Heal-step time of each healing loss, side by side: what a step with a teacher costs over cross-entropy.

    python benchmarks/bench_heal_losses.py [--member runs/smollm2-family:1] [--variants ce,ce+kd] [--rounds 7]
        [--json OUT]

The student is a stored member (default: the main job's 75 % member), the teacher the parent; every variant is
the family's heal step (`make_heal_step`, AdamW, batch 4 × 256, float32) with its loss:

  ce         cross-entropy only (no teacher forward)
  ce+kd      (1 − w)·CE + w·KL(parent ‖ member), w = 0.5 (the family's default)
  kd         distillation only, w = 1
  kd-top64   distillation from the parent's 64 most likely tokens per position

The steps take turns for --rounds rounds after a warm-up (compiling) step each, in one process, so that a slow
spell of the machine hits all alike; medians. Each variant holds its own train state and compiled step (about
3 GB on the CPU, more with a top-k teacher), so the default times two. `experiments/distill_study.py --time-ratio` takes the ce+kd / ce
ratio to give cross-entropy distillation's wall time in tokens.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
from timing import keep_freed_memory, round_robin_medians

VARIANTS = {"ce": {"kd_weight": 0.0}, "ce+kd": {"kd_weight": 0.5}, "kd": {"kd_weight": 1.0},
            "kd-top64": {"kd_weight": 1.0, "kd_top_k": 64}}


def heal_step(config, params, teacher, teacher_params, tokens, **loss):
    """An argument-less heal step of `config` with `loss` (HealConfig fields), after one warm-up step."""
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.optim import HealConfig
    from plrd_jax.training.state import init_train_state
    from plrd_jax.training.step import make_heal_step

    mesh = make_mesh((1, -1, 1))
    heal = HealConfig(lr=1e-5, warmup_steps=0, total_steps=100, **loss)
    shardings = param_shardings(params, mesh)
    distils = heal.kd_weight > 0
    step = make_heal_step(config, heal, mesh, shardings, teacher=teacher if distils else None)
    box = [init_train_state(params, heal, mesh, shardings)]
    extra = teacher_params if distils else None

    def run():
        box[0], metrics = step(box[0], tokens, extra)
        jax.block_until_ready(metrics)

    run()
    return run


def main():
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--member", default="runs/smollm2-family:1")
    ap.add_argument("--parent", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--variants", default="ce,ce+kd", help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from plrd_jax.io.load import load_model

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "ce" not in names:
        raise SystemExit(f"--variants: some of {', '.join(VARIANTS)}, ce among them")
    teacher, teacher_params, _ = load_model(args.parent)
    config, params, _ = load_model(args.member)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.batch, args.seq_len)).astype(np.int32)
    steps = {n: heal_step(config, params, teacher, teacher_params, tokens, **VARIANTS[n]) for n in names}
    medians = round_robin_medians(steps, args.rounds)
    print(f"student {args.member}, teacher {args.parent}, batch {args.batch} × {args.seq_len}, float32, "
          f"{os.cpu_count()} CPU cores; median of {args.rounds} rounds:")
    print("| loss | step s | × ce |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {medians[n]:.2f} | {medians[n] / medians['ce']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"member": args.member, "rounds": args.rounds, "seconds": medians,
                       "ratio_to_ce": {n: medians[n] / medians["ce"] for n in names}}, f, indent=1)


if __name__ == "__main__":
    main()
