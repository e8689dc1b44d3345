"""Families side by side: progressive against one-shot (and any other variants) at equal healing tokens.

    python -m plrd_jax family --out runs/plrd-progressive                       # the README's main job
    python -m plrd_jax family --one-shot --out runs/plrd-oneshot
    python -m plrd_jax family --kd-weight 0.5 --out runs/plrd-progressive-kd
    python experiments/family_study.py progressive=runs/plrd-progressive one-shot=runs/plrd-oneshot \
        progressive+KD=runs/plrd-progressive-kd [--out experiments/results/family]

Reads each family store's member metadata (no model is loaded) and writes OUT.md (one row per member size:
params, PPL before and after healing in every family, and the ratio of each family's healed PPL to the first
family's), OUT.csv and OUT.png (healed PPL against parameters, one line per family, the unhealed members
dashed). Families must have the same stage names; "equal tokens" means the same healing tokens per member.
"""
from __future__ import annotations

import argparse
import csv
import os

from plrd_jax.report import markdown_table, write_csv


def load(directory: str) -> tuple[list[dict], dict]:
    from plrd_jax.store import FamilyStore

    store = FamilyStore(directory, read_only=True)
    members = store.members()
    if not members:
        raise SystemExit(f"{directory}: no finished members")
    return [m["result"] for m in members], members[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="+", help="LABEL=FAMILY_DIR, the first is the reference")
    ap.add_argument("--parent-ppl", type=float, default=None, help="drawn as a star (default: the first family's summary.csv)")
    ap.add_argument("--out", default="experiments/results/family")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {}
    for item in args.families:
        label, sep, directory = item.partition("=")
        if not sep or not os.path.isdir(directory):
            raise SystemExit(f"expected LABEL=FAMILY_DIR with an existing directory, got {item!r}")
        families[label] = load(directory)
    (ref_label, (ref, ref_meta)), others = next(iter(families.items())), list(families.items())[1:]
    names = [r["name"] for r in ref]
    for label, (results, _) in others:
        if [r["name"] for r in results] != names or [r["tokens"] for r in results] != [r["tokens"] for r in ref]:
            raise SystemExit(f"{label}: members or healing tokens differ from {ref_label}'s; not comparable")

    columns = ["member", "params", "% of parent"]
    for label in families:
        columns += [f"{label} before", f"{label} after"]
    columns += [f"{label} / {ref_label}" for label, _ in others]
    rows = []
    for i, r in enumerate(ref):
        row = [r["name"], f"{r['params']:,}", f"{100 * r['fraction']:.1f}"]
        for results, _ in families.values():
            row += [f"{results[i]['ppl_before']:.4g}", f"{results[i]['ppl_after']:.4g}"]
        row += [f"{results[i]['ppl_after'] / r['ppl_after']:.3f}" for _, (results, _) in others]
        rows.append(row)
    schedule = ref_meta["schedule"]
    heal = schedule["heal"]
    heal_spec, eval_spec = ref_meta["data"]["heal"], ref_meta["data"]["eval"]
    lines = [f"Parent {ref_meta['parent']}; healing {ref[0]['tokens']:,} tokens per member "
             f"({schedule['batch_size']} × {schedule['seq_len']} per step), AdamW lr {heal['lr']}, "
             f"{schedule['decomposition']} factors, {schedule['allocation']} ranks; healing text "
             f"{heal_spec['source']}, evaluation {eval_spec['source']} ({eval_spec['windows']} windows of "
             f"{eval_spec['seq_len']} tokens).",
             "", markdown_table(rows, columns)]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    write_csv(args.out + ".csv", rows, columns)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, (label, (results, _)) in enumerate(families.items()):
        color = f"C{k}"
        xs = [r["params"] / 1e6 for r in results]
        ax.plot(xs, [r["ppl_after"] for r in results], marker="o", color=color, label=f"{label}, healed")
        ax.plot(xs, [r["ppl_before"] for r in results], marker=".", linestyle="--", color=color, alpha=0.6,
                label=f"{label}, before healing")
    parent_ppl = args.parent_ppl
    summary = os.path.join(args.families[0].partition("=")[2], "summary.csv")
    if parent_ppl is None and os.path.exists(summary):  # the family command's table has the parent's row
        with open(summary) as f:
            parent_ppl = next((float(row["PPL before heal"]) for row in csv.DictReader(f) if row["member"] == "parent"),
                              None)
    if parent_ppl:
        ax.plot([ref[0]["params"] / ref[0]["fraction"] / 1e6], [parent_ppl], marker="*", markersize=14,
                linestyle="none", color="k", label="parent")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Single-parent families at equal healing tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    print("\n".join(lines), end="")
    print(f"wrote {args.out}.md, .csv, .png")


if __name__ == "__main__":
    main()
