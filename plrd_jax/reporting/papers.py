"""The papers' tables: our runs beside the published numbers, every row stating its scale.

Rows come from
  family stores     every finished member's metadata (PLRD, streamed, Sheared-LLaMA and pretraining runs all
                    write one): method, parent, parameter count, tokens, perplexity
  zero-shot files   the JSON `python -m plrd_jax zeroshot --out FILE` writes: acc / acc_norm per task of a model
  result files      an experiment's JSON with {"results": {NAME: {"method", "tokens", "eval_ppl", ...}}}
and `PUBLISHED`, the papers' own rows (source given per row). Each setting (`SETTINGS`: plrd, sheared,
pretrain) is one Markdown table; `render` returns them all.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any


class TableError(ValueError):
    """An input that holds no run, member or result to tabulate."""


@dataclasses.dataclass(frozen=True)
class Row:
    setting: str  # "plrd", "sheared", "pretrain"
    source: str  # "ours" or the paper
    method: str
    model: str
    params: float | None
    tokens: float | None  # training / healing tokens of this model (not the parent's pretraining)
    scale: str  # what the run is: parent, target size, data
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # "ppl", "<task> acc", "avg acc"


SETTINGS = {
    "plrd": "PLRD: a family from one parent (progressive low-rank decomposition + short healing)",
    "sheared": "Sheared-LLaMA: targeted structured pruning + continued pretraining",
    "pretrain": "Pretraining from scratch on the GaLore benchmark: full rank, low-rank, CoLA, SLTrain",
}
METHOD_SETTING = {"plrd": "plrd", "plrd-streamed": "plrd", "sheared": "sheared", "full": "pretrain",
                  "lowrank": "pretrain", "cola": "pretrain", "cola-m": "pretrain", "sltrain": "pretrain"}

_SHEARED = "Sheared-LLaMA (Xia et al., ICLR 2024), lm-eval average of 11 tasks"
_GALORE = "GaLore (Zhao et al., 2024) Table 2, C4 validation perplexity"
_UNVERIFIED = "recalled, not checked against the paper"
PUBLISHED: tuple[Row, ...] = (
    Row("plrd", "PLRD (arXiv 2406.19995)", "plrd", "Mistral-7B-v0.1 → 3.1B", 3.1e9, 1e9,
        "7B parent, ≈1B healing tokens; zero-shot LogiQA, BoolQ, MMLU, WinoGrande (accuracies not transcribed)"),
    Row("plrd", "PLRD (arXiv 2406.19995)", "plrd", "LLaMA-2-7B → 3.3B", 3.3e9, 1e9,
        "7B parent, ≈1B healing tokens; zero-shot LogiQA, BoolQ, MMLU, WinoGrande (accuracies not transcribed)"),
    Row("sheared", _SHEARED, "sheared", "Sheared-LLaMA-1.3B", 1.3e9, 50.4e9,
        "LLaMA-2-7B parent, 0.4B pruning + 50B continued tokens", {"avg acc": 51.0}),
    Row("sheared", _SHEARED, "sheared", "Sheared-LLaMA-2.7B", 2.7e9, 50.4e9,
        "LLaMA-2-7B parent, 0.4B pruning + 50B continued tokens", {"avg acc": 56.7}),
    Row("sheared", _SHEARED, "dense", "LLaMA-2-7B", 6.7e9, 2e12, "the parent (2T pretraining tokens)",
        {"avg acc": 64.6}),
    Row("sheared", _SHEARED, "dense", "TinyLlama-1.1B", 1.1e9, 3e12, "trained from scratch", {"avg acc": 50.0}),
    Row("sheared", _SHEARED, "dense", "Pythia-1.4B", 1.4e9, 300e9, "trained from scratch", {"avg acc": 48.9}),
    Row("sheared", _SHEARED, "dense", "OPT-1.3B", 1.3e9, 300e9, "trained from scratch", {"avg acc": 48.2}),
    Row("sheared", _SHEARED, "dense", "OpenLLaMA-3B-v2", 3e9, 1e12, "trained from scratch", {"avg acc": 55.7}),
    Row("sheared", _SHEARED, "dense", "INCITE-3B", 2.8e9, 800e9, "trained from scratch", {"avg acc": 54.7}),
) + tuple(
    Row("pretrain", _GALORE if method in ("full", "lowrank") else f"{paper} ({_UNVERIFIED})", method,
        f"LLaMA-{size}", None, tokens, f"GaLore benchmark {size}: C4, T5 tokenizer, seq 256, 512 seq/step",
        {"ppl": ppl})
    for method, paper, values in (
        ("full", "GaLore", (34.06, 25.08, 18.80, 15.56)),
        ("lowrank", "GaLore", (78.18, 45.51, 37.41, 142.53)),
        ("cola", "CoLA (Liu et al., 2025)", (34.04, 24.48, 19.40, 15.52)),
        ("sltrain", "SLTrain (Han et al., 2024)", (34.15, 26.04, 19.42, 16.14)))
    for size, tokens, ppl in zip(("60M", "130M", "350M", "1B"), (1.1e9, 2.2e9, 6.4e9, 13.1e9), values))


# ---- reading our runs ------------------------------------------------------------------------------------
def _number(x) -> float | None:
    return None if x is None else float(x)


def _first(x) -> float:
    """A PPL, or the first corpus's of a {corpus: PPL} record (the family's in-domain WikiText-2 evaluation)."""
    return float(next(iter(x.values())) if isinstance(x, dict) else x)


def _ppl(meta: dict[str, Any]) -> float | None:
    for key in ("ppl_after", "eval_ppl"):
        if meta.get(key) is not None:
            return _first(meta[key])
    result = meta.get("result") or {}
    for key in ("ppl_after", "eval_ppl"):
        if result.get(key) is not None:
            return _first(result[key])
    evals = meta.get("evals") or []
    return float(evals[-1]["ppl"]) if evals else None


def _same_dir(a, b) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def member_rows(family_dir: str | os.PathLike, zeroshot: dict[str, dict[str, float]] | None = None) -> list[Row]:
    """One row per finished member of the family store at `family_dir`; `zeroshot` (model spec -> metrics, see
    `zeroshot_metrics`) adds the scores of specs naming one of its members (FAMILY_DIR:N or FAMILY_DIR:NAME)."""
    from plrd_jax.io.store import FamilyStore

    store = FamilyStore(family_dir, read_only=True)
    rows = []
    for meta in store.members():
        method = meta.get("method", "plrd")
        setting = METHOD_SETTING.get(method, "plrd")
        params, tokens = _number(meta.get("params")), _number(meta.get("tokens"))
        parent = meta.get("parent") or "from scratch"
        scale = f"parent {Path(str(parent)).name}" if setting != "pretrain" else f"{meta.get('name')} from scratch"
        data = (meta.get("data") or {}).get("heal", meta.get("data")) if isinstance(meta.get("data"), dict) else None
        if isinstance(data, dict) and data.get("source"):
            scale += f", data {data['source']}"
        metrics = {}
        ppl = _ppl(meta)
        if ppl is not None:
            metrics["ppl"] = ppl
        for spec, extra in (zeroshot or {}).items():
            directory, _, ref = spec.rpartition(":")
            if directory and _same_dir(directory, family_dir) and ref in (str(meta["member"]), meta.get("name")):
                metrics.update(extra)
        rows.append(Row(setting, "ours", method, f"{Path(family_dir).name}:{meta['name']}", params, tokens, scale,
                        metrics))
    return rows


def zeroshot_metrics(files) -> dict[str, dict[str, float]]:
    """model spec -> {"<task> acc": %, "<task> acc_norm": %, "avg acc": %} from zeroshot JSON files."""
    out: dict[str, dict[str, float]] = {}
    for file in files:
        try:
            data = json.loads(Path(file).read_text())
            model, tasks = data["model"], data["tasks"]
        except (OSError, ValueError, KeyError, TypeError):
            raise TableError(f"{file} is not a zero-shot result file (JSON with 'model' and 'tasks')") from None
        metrics = out.setdefault(model, {})
        for task, r in tasks.items():
            metrics[f"{task} acc"] = 100 * r["acc"]
            metrics[f"{task} acc_norm"] = 100 * r["acc_norm"]
        accs = [v for k, v in metrics.items() if k.endswith(" acc") and k != "avg acc"]
        metrics["avg acc"] = sum(accs) / len(accs)
    return out


def result_rows(file: str | os.PathLike) -> list[Row]:
    """Rows from an experiment's results JSON ({"results": {NAME: {...}}, "settings": {...}})."""
    data = json.loads(Path(file).read_text())
    settings = data.get("settings", {})
    rows = []
    for name, r in (data.get("results") or {}).items():
        if not isinstance(r, dict) or "method" not in r:
            continue
        params = r.get("params") or (r.get("counts") or {}).get("total")
        scale = Path(file).stem + (f": {settings.get('steps')} steps × {settings.get('batch_size')} × "
                                   f"{settings.get('seq_len')} tokens" if settings.get("steps") else "")
        metrics = {"ppl": float(r["eval_ppl"])} if r.get("eval_ppl") is not None else {}
        rows.append(Row(METHOD_SETTING.get(r["method"], "pretrain"), "ours", r["method"], name, _number(params),
                        _number(r.get("tokens")), scale, metrics))
    if not rows:
        raise TableError(f"{file} has no results with a 'method' to tabulate")
    return rows


def collect(paths, zeroshot_files=()) -> list[Row]:
    """Our rows from family directories and result JSON files, zero-shot results merged in by model spec."""
    zeroshot = zeroshot_metrics(zeroshot_files)
    rows: list[Row] = []
    for path in paths:
        p = Path(path)
        if p.is_file() and p.suffix == ".json":
            rows += result_rows(p)
        elif p.is_dir() and any(c.name.isdigit() and (c / "metadata").is_dir() for c in p.iterdir()):
            rows += member_rows(p, zeroshot)
        elif p.exists():
            raise TableError(f"{p} is neither a family store (a directory of numbered checkpoints) nor a results "
                             f".json file")
        else:
            raise TableError(f"{p} does not exist")
    return rows


# ---- rendering ---------------------------------------------------------------------------------------------
def _count(x: float | None) -> str:
    if x is None:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.0f}"


def _metric(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.4g}" if x < 1e5 else f"{x:.2e}"


def render(rows, published=PUBLISHED, settings=SETTINGS) -> str:
    """Markdown: for each setting with rows, the published rows then ours, metric columns in first-seen order."""
    rows = list(published) + list(rows)
    out = []
    for setting, title in settings.items():
        chosen = [r for r in rows if r.setting == setting]
        if not any(r.source == "ours" for r in chosen):
            continue
        metrics: list[str] = []
        for r in chosen:
            metrics += [m for m in r.metrics if m not in metrics]
        header = ["source", "method", "model", "params", "tokens", *metrics, "scale"]
        out += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in chosen:
            cells = [r.source, r.method, r.model, _count(r.params), _count(r.tokens),
                     *(_metric(r.metrics.get(m)) for m in metrics), r.scale]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    if not out:
        raise TableError("no runs of ours to tabulate (give family directories or result .json files)")
    return "\n".join(out)
