"""Tables and plots of family results (Markdown, CSV, PNG)."""
from __future__ import annotations

import csv
import os
from typing import Sequence

COLUMNS = ("member", "name", "params", "% of parent", "PPL before heal", "PPL after heal", "tokens", "wall s")


def _fmt_ppl(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def family_rows(results: Sequence, parent_params: int, parent_ppl: float | None = None) -> list[list[str]]:
    rows = []
    if parent_ppl is not None:
        rows.append(["parent", "parent", f"{parent_params:,}", "100.0", _fmt_ppl(parent_ppl), "", "0", ""])
    for r in results:
        rows.append([str(r.member), r.name, f"{r.params:,}", f"{100 * r.params / parent_params:.1f}",
                     _fmt_ppl(r.ppl_before), _fmt_ppl(r.ppl_after), f"{r.tokens:,}", f"{r.wall_s:.0f}"])
    return rows


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
                       title: str = "Perplexity against parameter count") -> None:
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
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
