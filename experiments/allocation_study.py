"""Which matrices to factorize and how to calibrate: rank allocations and sequential calibration, on every corpus.

    python experiments/allocation_study.py [--reductions 0.1,0.25] [--out runs/allocation]

One member straight from the parent per (reduction, variant), whitened factors (SVD-LLM), no healing,
calibrated on 32 windows of 512 tokens of the family's default calibration text and scored on its five
evaluation corpora (`python -m plrd_jax compress ...`):

  uniform             one rank fraction for every matrix (the family's default)
  energy              one level of each matrix's whitened spectrum energy
  sensitivity         per matrix, stay dense or take a rank, whichever costs least output error per parameter
                      saved (a 576-wide matrix must lose more than half its rank before factorizing saves anything)
  uniform-sequential  uniform ranks, each layer whitened with the inputs the already compressed layers give it

Writes experiments/results/allocation.{md,csv}: per member the PPL / parent's on every corpus, their geometric
mean, and how many of the 210 matrices stayed dense. Each compress run is skipped when its member is stored.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"uniform": ["--allocation", "uniform"], "energy": ["--allocation", "energy"],
            "sensitivity": ["--allocation", "sensitivity"],
            "uniform-sequential": ["--allocation", "uniform", "--sequential"]}


def stored(out):
    from plrd_jax.io.store import FamilyStore

    if not os.path.isdir(out):
        return {}
    return {m["name"]: m for m in FamilyStore(out, read_only=True).members()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reductions", default="0.1,0.25")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calibration-data", default=None, help="default: the compress command's")
    ap.add_argument("--out", default="runs/allocation")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "allocation"))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    reductions = [float(x) for x in args.reductions.split(",")]
    for reduction in reductions:
        for v in variants:
            name = f"whitened-{v}-{round(100 * reduction)}%"
            if name in stored(args.out):
                continue
            cmd = [sys.executable, "-m", "plrd_jax", "compress", "--reduction", str(reduction), "--multiple-of", "1",
                   "--out", args.out, *VARIANTS[v]]
            if args.calibration_data:
                cmd += ["--calibration-data", args.calibration_data]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)

    from plrd_jax.reporting.tables import markdown_table, write_csv

    members = stored(args.out)
    first = next(iter(members.values()))
    corpora, unseen = list(first["parent_ppl"]), first["unseen"]
    columns = (["reduction", "variant", "params", "dense matrices"]
               + [f"{c}{' (unseen)' if c in unseen else ''} ×" for c in corpora] + ["geo-mean ×"])
    rows = []
    for reduction in reductions:
        for v in variants:
            m = members[f"whitened-{v}-{round(100 * reduction)}%"]
            ratios = [m["ppl_after"][c] / m["parent_ppl"][c] for c in corpora]
            factorized = sum(len(layer) for layer in m["decomposition_report"]["ranks_by_layer"].values())
            rows.append([f"{100 * reduction:.0f} %", v, f"{m['params']:,}", str(210 - factorized)]
                        + [f"{r:.2f}" for r in ratios] + [f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}"])
    table = markdown_table(rows, columns)
    text = (f"Calibration: {first['calibration']}; no healing; `python experiments/allocation_study.py "
            f"--reductions {args.reductions} --variants {args.variants}`.\n\n{table}")
    with open(args.results + ".md", "w") as f:
        f.write(text)
    write_csv(args.results + ".csv", rows, columns)
    print(text)


if __name__ == "__main__":
    main()
