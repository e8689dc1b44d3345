"""Tables and plots of family results (Markdown, CSV, PNG)."""
from __future__ import annotations

import csv
import os
import math
from typing import Mapping, Sequence

COLUMNS = ("member", "name", "params", "% of parent", "PPL before heal", "PPL after heal", "tokens", "wall s")


def fmt_ppl(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def _geomean(values) -> float:
    values = [math.log(v) for v in values]
    return math.exp(sum(values) / len(values))


def corpus_label(name: str, unseen: Sequence[str]) -> str:
    return f"{name} (unseen)" if name in unseen else name


def summary_columns(corpora: Sequence[str], unseen: Sequence[str] = ()) -> list[str]:
    """Columns of `summary_rows`: one per evaluation corpus (healed PPL and its ratio to the parent), the
    geometric mean of those ratios after and before healing, and the worst unseen ratio over the in-domain
    geometric mean (the collapse check: ≤ 1.5 wanted)."""
    return (["member", "name", "params", "% of parent", "tokens", "wall s"]
            + [f"{corpus_label(c, unseen)} PPL (× parent)" for c in corpora]
            + ["geo-mean × parent", "geo-mean × before heal", "worst unseen × / in-domain ×"])


def summary_rows(results: Sequence, parent_params: int, parent_ppl: Mapping[str, float],
                 unseen: Sequence[str] = ()) -> list[list[str]]:
    """One row for the parent and one per member; results have name, member, params, tokens, wall_s and
    ppl_before / ppl_after: {corpus: PPL} over the corpora of parent_ppl."""
    corpora = list(parent_ppl)
    seen = [c for c in corpora if c not in unseen]
    rows = [["parent", "parent", f"{parent_params:,}", "100.0", "0", ""]
            + [f"{fmt_ppl(parent_ppl[c])} (1.00×)" for c in corpora] + ["1.00", "1.00", "1.00" if unseen else ""]]
    for r in results:
        after = {c: r.ppl_after[c] / parent_ppl[c] for c in corpora}
        before = {c: r.ppl_before[c] / parent_ppl[c] for c in corpora}
        collapse = ""
        if unseen and seen:
            collapse = f"{max(after[c] for c in unseen) / _geomean(after[c] for c in seen):.2f}"
        rows.append([str(r.member), r.name, f"{r.params:,}", f"{100 * r.params / parent_params:.1f}",
                     f"{r.tokens:,}", f"{r.wall_s:.0f}"]
                    + [f"{fmt_ppl(r.ppl_after[c])} ({after[c]:.2f}×)" for c in corpora]
                    + [f"{_geomean(after.values()):.2f}", f"{_geomean(before.values()):.2f}", collapse])
    return rows


def plot_ratios(path: str, results: Sequence, parent_params: int, parent_ppl: Mapping[str, float],
                unseen: Sequence[str] = (), title: str = "Members against their parent, per corpus") -> None:
    """PPL / parent PPL against parameters, one curve per evaluation corpus (healed; dashed: unseen corpora)
    and the geometric mean in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    members = sorted(results, key=lambda r: r.params)
    xs = [r.params / 1e6 for r in members] + [parent_params / 1e6]
    for c in parent_ppl:
        ys = [r.ppl_after[c] / parent_ppl[c] for r in members] + [1.0]
        ax.plot(xs, ys, marker="o", linestyle="--" if c in unseen else "-", label=corpus_label(c, unseen))
    ys = [_geomean(r.ppl_after[c] / parent_ppl[c] for c in parent_ppl) for r in members] + [1.0]
    ax.plot(xs, ys, marker="s", color="black", linewidth=2, label="geometric mean")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("perplexity / parent's (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def markdown_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[c.replace(",", "") for c in row] for row in rows])


def plot_ppl_vs_params(path: str, series: dict[str, list[tuple[float, float]]], parent: tuple[float, float] | None,
                       title: str = "Perplexity against parameter count", ylabel: str = "perplexity (log scale)"
                       ) -> None:
    """series: label -> [(params, ppl)], one line each; parent: (params, ppl) drawn as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p / 1e6 for p, _ in points], [q for _, q in points], marker="o", label=label)
    if parent:
        ax.plot([parent[0] / 1e6], [parent[1]], marker="*", markersize=14, linestyle="none", label="parent")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
