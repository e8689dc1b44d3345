"""Families side by side on every evaluation corpus: variants of the recipe at equal healing tokens.

    python -m plrd_jax family --out runs/plrd                                    # the README's main job
    python -m plrd_jax family --kd-weight 1 --out runs/plrd-kd                   # a variant
    python experiments/family_study.py default=runs/plrd kd=runs/plrd-kd [--out experiments/results/family]
    python experiments/family_study.py plrd=runs/plrd minitron=runs/minitron#minitron sheared=runs/sheared#sheared

Reads each family store's member metadata (no model is loaded): every member's PPL on each evaluation corpus
before and after healing, and the parent's on the same corpora. Writes OUT.md: one row per family and member
with each corpus's PPL and its ratio to the parent, the geometric mean of the ratios after and before healing,
and the worst unseen corpus's ratio over the in-domain geometric mean (the collapse check); OUT.csv; OUT.png
(geometric-mean ratio against parameters, one line per family, the worst unseen corpus dashed). Families must
be scored on the same corpora. `LABEL=DIR#METHOD` takes only that method's members of a shared store; the
parent's PPL comes from the first store that records it (family and Minitron runs do).
"""
from __future__ import annotations

import argparse
import math
import os

from plrd_jax.reporting.tables import fmt_ppl, markdown_table, write_csv


def load(directory: str, method: str | None) -> tuple[list[dict], dict]:
    """(one record per finished member: name, params, fraction, tokens, wall_s, ppl_before, ppl_after; the first
    member's metadata)."""
    from plrd_jax.io.store import FamilyStore

    store = FamilyStore(directory, read_only=True)
    members = [m for m in store.members() if method is None or m.get("method", "plrd") == method]
    if not members:
        raise SystemExit(f"{directory}: no finished members" + (f" of method {method}" if method else ""))
    if not isinstance(members[0].get("ppl_after"), dict):
        raise SystemExit(f"{directory}: members were scored on one corpus only (an older store); rebuild it")
    return [{**m["result"], "name": m["name"]} for m in members], members[0]


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="+", help="LABEL=FAMILY_DIR")
    ap.add_argument("--out", default="experiments/results/family")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {}
    for item in args.families:
        label, sep, directory = item.partition("=")
        directory, _, method = directory.partition("#")
        if not sep or not os.path.isdir(directory):
            raise SystemExit(f"expected LABEL=FAMILY_DIR[#METHOD] with an existing directory, got {item!r}")
        families[label] = load(directory, method or None)
    first = next((meta for _, meta in families.values() if "parent_ppl" in meta), None)
    if first is None:
        raise SystemExit("no store records the parent's PPL per corpus (family and Minitron runs do)")
    parent, unseen = first["parent_ppl"], first["data"].get("unseen", [])
    corpora = list(parent)
    for label, (members, _) in families.items():
        if list(members[0]["ppl_after"]) != corpora:
            raise SystemExit(f"{label}: scored on {list(members[0]['ppl_after'])}, not {corpora}; not comparable")
    seen = [c for c in corpora if c not in unseen]

    columns = (["family", "member", "params", "% of parent", "tokens", "wall s"]
               + [f"{c}{' (unseen)' if c in unseen else ''}" for c in corpora]
               + ["geo-mean × parent", "geo-mean × before heal", "worst unseen × / in-domain ×"])
    rows = [["parent", "parent", f"{first['params'] / first['compression']:,.0f}", "100.0", "", ""]
            + [f"{fmt_ppl(parent[c])}" for c in corpora] + ["1.00", "1.00", "1.00"]]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for k, (label, (members, _)) in enumerate(families.items()):
        xs, ys, worst = [], [], []
        for m in members:
            after = {c: m["ppl_after"][c] / parent[c] for c in corpora}
            before = {c: m["ppl_before"][c] / parent[c] for c in corpora}
            collapse = max(after[c] for c in unseen) / geomean(after[c] for c in seen) if unseen and seen else None
            rows.append([label, m["name"], f"{m['params']:,}", f"{100 * m['fraction']:.1f}", f"{m['tokens']:,}",
                         f"{m['wall_s']:.0f}"]
                        + [f"{fmt_ppl(m['ppl_after'][c])} ({after[c]:.2f}×)" for c in corpora]
                        + [f"{geomean(after.values()):.2f}", f"{geomean(before.values()):.2f}",
                           "" if collapse is None else f"{collapse:.2f}"])
            xs.append(m["params"] / 1e6)
            ys.append(geomean(after.values()))
            worst.append(max(after[c] for c in unseen) if unseen else None)
        line, = ax.plot(xs, ys, marker="o", label=f"{label}: geo-mean")
        if unseen:
            ax.plot(xs, worst, marker=".", linestyle="--", color=line.get_color(), alpha=0.7,
                    label=f"{label}: worst unseen")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("healed PPL / parent's (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Families on every corpus")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out + ".png", dpi=120)
    plt.close(fig)

    heal = first["data"]["heal"]["source"]
    note = (f"Healing text: {heal}; evaluation: {', '.join(corpora)} (unseen by calibration and healing: "
            f"{', '.join(unseen) or 'none'}), {first['data']['eval'][corpora[0]]['tokens']} tokens each in windows "
            f"of {first['data']['eval'][corpora[0]]['seq_len']}. Command: `python experiments/family_study.py "
            + " ".join(args.families) + "`.\n\n")
    table = markdown_table(rows, columns)
    with open(args.out + ".md", "w") as f:
        f.write(note + table)
    write_csv(args.out + ".csv", rows, columns)
    print(note + table)
    print(f"wrote {args.out}.md, .csv, .png")


if __name__ == "__main__":
    main()
