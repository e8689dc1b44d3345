"""PLRD, Sheared-LLaMA and a Minitron-style baseline head to head at equal parameter counts and equal tokens.

    python experiments/three_way.py --plrd runs/smollm2-family [--budgets 0.9,0.75,0.5] [--out runs/three-way]

Members at each budget (a fraction of the parent's parameters, embeddings included), every one healed on the
family's default mixture (WikiText-2, books and speeches training splits) with the same tokens per member and
scored on the same five corpora (tiny-shakespeare and pydoc unseen):

  plrd      the progressive family of the main job (`--plrd`, its members at these budgets); each member is cut
            from the healed previous one, so its lineage has also seen the earlier members' tokens
  minitron  `family --method minitron`: pruned one-shot from the parent by activation importance (width: MLP
            channels, heads, hidden size), healed by distillation from the parent
  sheared   `shear --target`: learned L0 masks to exactly the Minitron member's shape (so both pruned methods
            have the same parameter count), then continued training; its tokens are split between pruning and
            continuing (3/8 and 5/8)

Writes experiments/results/three_way.{md,csv,png} through experiments/family_study.py. Each run resumes.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plrd", required=True, help="the main job's family directory (PLRD members)")
    ap.add_argument("--budgets", default="0.9,0.75,0.5")
    ap.add_argument("--tokens", type=int, default=8192, help="healing tokens per member")
    ap.add_argument("--out", default="runs/three-way")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "three_way"))
    args = ap.parse_args(argv)

    from plrd_jax.io.load import load_model
    from plrd_jax.methods.minitron import target_for_budget
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.io.store import FamilyStore

    budgets = [float(x) for x in args.budgets.split(",")]
    plrd = {round(m["compression"], 2): m["name"] for m in FamilyStore(args.plrd, read_only=True).members()}
    missing = [b for b in budgets if round(b, 2) not in plrd]
    if missing:
        raise SystemExit(f"{args.plrd} has no PLRD member at {missing} of the parent; it has {sorted(plrd)}")
    config, params, _ = load_model("smollm2-135m")
    total = count_params(params)
    py = sys.executable
    minitron_dir, sheared_dir = os.path.join(args.out, "minitron"), os.path.join(args.out, "sheared")
    run([py, "-m", "plrd_jax", "family", "--method", "minitron", "--schedule", args.budgets,
         "--heal-tokens", str(args.tokens), "--out", minitron_dir])
    prune_tokens = args.tokens * 3 // 8
    targets = []
    for b in budgets:
        t = target_for_budget(config, int(round(b * total))).resolve(config)
        targets += ["--target", f"{t.num_layers},{t.hidden_size},{t.num_heads},{t.num_kv_heads},"
                                f"{t.intermediate_size}"]
    run([py, "-m", "plrd_jax", "shear", "--out", sheared_dir, *targets, "--prune-tokens", str(prune_tokens),
         "--continue-tokens", str(args.tokens - prune_tokens)])
    run([py, os.path.join(HERE, "family_study.py"), f"plrd={args.plrd}#plrd", f"minitron={minitron_dir}#minitron",
         f"sheared={sheared_dir}#sheared", "--out", args.results])


if __name__ == "__main__":
    main()
