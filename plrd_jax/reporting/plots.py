"""Plots of family results (PNG, matplotlib imported only when a plot is drawn)."""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

from plrd_jax.evaluation.perplexity import geometric_mean
from plrd_jax.reporting.tables import corpus_label


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
    ys = [geometric_mean(r.ppl_after[c] / parent_ppl[c] for c in parent_ppl) for r in members] + [1.0]
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


def plot_rank_heatmap(path: str, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
                      title: str = "Ranks by layer and matrix") -> None:
    """PNG of layers (rows) × matrix kinds (columns): colour = parameters kept (rank·(d_in+d_out) / d_in·d_out,
    1 for a dense matrix), text = the rank ("–" when dense). shapes: path -> (d_in, d_out) of every matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_of = {p: int(m.group(1)) for p in shapes if (m := re.match(r"layers_(\d+)/", p))}
    kinds = list(dict.fromkeys(p.rsplit("/", 1)[-1] for p in layer_of))
    layers = sorted(set(layer_of.values()))
    kept = np.ones((len(layers), len(kinds)))
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.28 * len(layers)))
    for p, layer in layer_of.items():
        i, j = layers.index(layer), kinds.index(p.rsplit("/", 1)[-1])
        d_in, d_out = shapes[p]
        r = ranks.get(p)
        kept[i, j] = 1.0 if r is None else r * (d_in + d_out) / (d_in * d_out)
        ax.text(j, i, "–" if r is None else str(r), ha="center", va="center", fontsize=7)
    image = ax.imshow(kept, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="parameters kept")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
