"""Tokens against quality: the 75 % member after 8K, 32K and 128K healing tokens, on every corpus.

    python experiments/token_curve.py [--tokens 8192,32768,131072] [--losses ce,default] [--out runs/tokens]

Each point is a progressive family `--schedule 0.9,0.75` whose 90 % member is the main job's (8,192 tokens) and
whose 75 % member gets the given tokens, with the main job's data, calibration and evaluation corpora; `ce` heals
with cross-entropy, `default` with the family's default loss. Writes experiments/results/token_curve.{md,png}:
the 75 % member's PPL / parent's per corpus against healing tokens (one panel per loss, one line per corpus),
and the tokens at which each unseen corpus would reach the issue's 5× (read off the curve, log-linear between
points; "beyond" when the last point is still above). Each run resumes.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LOSSES = {"ce": ["--kd-weight", "0"], "default": []}


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def crossing(tokens, ratios, target):
    """Tokens at which the ratio first falls to `target`, log-linear between measured points; None if never."""
    for (t0, r0), (t1, r1) in zip(zip(tokens, ratios), zip(tokens[1:], ratios[1:])):
        if r0 <= target:
            return t0
        if r1 <= target:
            f = (math.log(r0) - math.log(target)) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0)))
    return tokens[0] if ratios and ratios[0] <= target else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,32768,131072")
    ap.add_argument("--losses", default="ce,default")
    ap.add_argument("--target", type=float, default=5.0, help="ratio to the parent the unseen corpora should reach")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs that are finished")
    ap.add_argument("--out", default="runs/tokens")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "token_curve"))
    args = ap.parse_args(argv)
    budgets = sorted(int(x) for x in args.tokens.split(","))
    losses = args.losses.split(",")
    if any(name not in LOSSES for name in losses):
        raise SystemExit(f"--losses: expected some of {', '.join(LOSSES)}")
    for t in ([] if args.no_run else reversed(budgets)):  # the longest runs first
        for loss in losses:
            run([sys.executable, "-m", "plrd_jax", "family", "--schedule", "0.9,0.75", "--heal-tokens", f"8192,{t}",
                 "--out", os.path.join(args.out, f"{loss}-{t}"), *LOSSES[loss]])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plrd_jax.reporting.tables import markdown_table
    from plrd_jax.io.store import FamilyStore

    curves, unseen, corpora = {}, [], []
    for loss in losses:
        for t in budgets:
            directory = os.path.join(args.out, f"{loss}-{t}")
            members = FamilyStore(directory, read_only=True).members() if os.path.isdir(directory) else []
            if len(members) < 2:
                continue  # not run (or not finished): left out of the curve
            member = members[-1]
            parent, unseen, corpora = member["parent_ppl"], member["data"]["unseen"], list(member["parent_ppl"])
            curves.setdefault(loss, []).append((t, {c: member["ppl_after"][c] / parent[c] for c in corpora}))
    fig, axes = plt.subplots(1, len(losses), figsize=(5.2 * len(losses), 4.2), sharey=True, squeeze=False)
    rows = []
    for ax, loss in zip(axes[0], losses):
        points = curves.get(loss, [])
        for c in corpora:
            ax.plot([t for t, _ in points], [r[c] for _, r in points], marker="o",
                    linestyle="--" if c in unseen else "-", label=f"{c}{' (unseen)' if c in unseen else ''}")
        ax.axhline(args.target, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("healing tokens of the 75 % member")
        ax.set_title(f"75 % member, {loss}")
        ax.grid(True, which="both", alpha=0.3)
        for t, r in points:
            geo = math.exp(sum(math.log(v) for v in r.values()) / len(r))
            rows.append([loss, f"{t:,}"] + [f"{r[c]:.2f}" for c in corpora] + [f"{geo:.2f}"])
    axes[0][0].set_ylabel("PPL / parent's")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.results + ".png", dpi=120)
    plt.close(fig)
    lines = []
    for loss in losses:
        for c in unseen:
            points = curves.get(loss, [])
            if not points:
                continue
            at = crossing([t for t, _ in points], [r[c] for _, r in points], args.target)
            if at:
                lines.append(f"- {loss}, {c}: ≤ {args.target:g}× from about {at:,.0f} tokens")
                continue
            note = f"- {loss}, {c}: ≤ {args.target:g}× not reached by {points[-1][0]:,} tokens"
            (t0, r0), (t1, r1) = ((points[-2][0], points[-2][1][c]), (points[-1][0], points[-1][1][c])) if len(
                points) > 1 else ((None, None), (None, None))
            if t0 and r1 < r0:  # the last two points' power law, continued
                slope = (math.log(r1) - math.log(r0)) / (math.log(t1) - math.log(t0))
                note += f"; their power law (ratio ∝ tokens^{slope:.2f}) reaches it near " \
                        f"{math.exp(math.log(t1) + (math.log(args.target) - math.log(r1)) / slope):,.0f} (extrapolated)"
            lines.append(note)
    table = markdown_table(rows, ["loss", "tokens (75 % member)"] + [f"{c}{' (unseen)' if c in unseen else ''} ×"
                                                                     for c in corpora] + ["geo-mean ×"])
    text = (f"`python experiments/token_curve.py --tokens {args.tokens} --losses {args.losses}`: the 75 % member's "
            f"PPL / parent's per corpus.\n\n{table}\n" + "\n".join(lines) + "\n")
    with open(args.results + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
