"""How to heal: cross-entropy against distillation variants, at equal tokens and at equal wall time, on every corpus.

    python experiments/distill_study.py [--schedule 0.9,0.75] [--out runs/distill]

Each variant is a progressive family (`python -m plrd_jax family --schedule 0.9,0.75`, the main job's default data,
calibration and evaluation corpora, 8,192 healing tokens per member) that differs only in its loss:

  ce            cross-entropy on the healing text
  kd            distillation from the parent: KL(parent ‖ member) over the full vocabulary, temperature 1
  kd-top64      the same from the parent's 64 most likely tokens per position (plus one bucket for the rest)
  kd-T2         full distillation at temperature 2
  ce+kd         half of each (--kd-weight 0.5)
  kd-previous   distillation from the healed previous member (the parent for the first)
  ce-same-time  cross-entropy given the tokens that fit in the default loss's (ce+kd) heal-step time (its steps
                are cheaper: no teacher forward), rounded down to whole steps

Writes experiments/results/distill.{md,csv,png} through experiments/family_study.py. The step-time ratio that
sets the equal-time budget is --time-ratio, by default the ce+kd / ce ratio measured by
`python benchmarks/bench_heal_losses.py --json experiments/results/bench_heal_losses.json` (the steps timed side
by side in one process, not the runs' own wall times, which depend on what else the machine did); it is printed
and written beside the table. Each run resumes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "ce": ["--kd-weight", "0"],
    "kd": ["--kd-weight", "1"],
    "kd-top64": ["--kd-weight", "1", "--kd-top-k", "64"],
    "kd-T2": ["--kd-weight", "1", "--kd-temperature", "2"],
    "ce+kd": ["--kd-weight", "0.5"],
    "kd-previous": ["--kd-weight", "1", "--teacher", "previous"],
}


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


BENCH = os.path.join(HERE, "results", "bench_heal_losses.json")


def measured_ratio() -> float:
    """ce+kd / ce heal-step time from benchmarks/bench_heal_losses.py's JSON."""
    import json

    if not os.path.isfile(BENCH):
        raise SystemExit(f"ce-same-time needs the step-time ratio: run python benchmarks/bench_heal_losses.py "
                         f"--json {os.path.relpath(BENCH)} first, or pass --time-ratio")
    with open(BENCH) as f:
        return json.load(f)["ratio_to_ce"]["ce+kd"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default="0.9,0.75")
    ap.add_argument("--tokens", type=int, default=8192, help="healing tokens per member")
    ap.add_argument("--time-ratio", type=float, default=None,
                    help="ce+kd / ce heal-step time for ce-same-time (default: benchmarks/bench_heal_losses.py's)")
    ap.add_argument("--variants", default=",".join([*VARIANTS, "ce-same-time"]))
    ap.add_argument("--out", default="runs/distill")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "distill"))
    args = ap.parse_args(argv)

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n != "ce-same-time"]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {', '.join([*VARIANTS, 'ce-same-time'])}")
    family = [sys.executable, "-m", "plrd_jax", "family", "--schedule", args.schedule]
    for name in names:
        if name in VARIANTS:
            run(family + ["--heal-tokens", str(args.tokens), "--out", os.path.join(args.out, name), *VARIANTS[name]])
    note = ""
    if "ce-same-time" in names:
        ratio = args.time_ratio or measured_ratio()
        step = 4 * 256  # the plrd preset's tokens per step
        tokens = int(args.tokens * ratio) // step * step
        note = (f"ce-same-time: a heal step with the default loss (ce+kd) takes {ratio:.2f}× a cross-entropy one "
                f"(benchmarks/bench_heal_losses.py), so cross-entropy gets {tokens:,} tokens per member.\n")
        print(note, flush=True)
        run(family + ["--heal-tokens", str(tokens), "--kd-weight", "0", "--out", os.path.join(args.out, "ce-same-time")])
    run([sys.executable, os.path.join(HERE, "family_study.py"),
         *[f"{n}={os.path.join(args.out, n)}" for n in names], "--out", args.results])
    if note:
        with open(args.results + ".md", "a") as f:
            f.write("\n" + note)


if __name__ == "__main__":
    main()
