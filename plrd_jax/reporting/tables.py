"""Tables of family results: the per-corpus summary (ratios to the parent, geometric means, the collapse
check), Markdown and CSV."""
from __future__ import annotations

import csv
from typing import Mapping, Sequence

from plrd_jax.evaluation.perplexity import geometric_mean

COLUMNS = ("member", "name", "params", "% of parent", "PPL before heal", "PPL after heal", "tokens", "wall s")


def fmt_ppl(x: float) -> str:
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


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
            collapse = f"{max(after[c] for c in unseen) / geometric_mean(after[c] for c in seen):.2f}"
        rows.append([str(r.member), r.name, f"{r.params:,}", f"{100 * r.params / parent_params:.1f}",
                     f"{r.tokens:,}", f"{r.wall_s:.0f}"]
                    + [f"{fmt_ppl(r.ppl_after[c])} ({after[c]:.2f}×)" for c in corpora]
                    + [f"{geometric_mean(after.values()):.2f}", f"{geometric_mean(before.values()):.2f}", collapse])
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
