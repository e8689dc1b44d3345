"""CPU-scale pretraining study: full rank, plain low-rank, CoLA, CoLA-M and SLTrain trained from scratch to equal
tokens on local text; a table (parameters, compiled peak memory, tokens/s, validation perplexity) and loss curves.

    python experiments/pretrain_study.py [--steps 100] [--batch-size 8] [--seq-len 256] [--eval-every 50]
        [--eval-windows 128] [--cola-m-steps 12] [--methods full,lowrank,cola,sltrain,cola-m]
        [--controls full@0.003] [--out experiments/results] [--fresh]

Model: the llama-20m preset's shape (GaLore's configs/llama_20m.json: d 256, 4 layers, 4 heads, intermediate 688,
untied head), r = d/4 = 64 for the factorized methods (the papers' ratio), SLTrain δ 0.03, α 16 (α/r = 1/4,
its 60M setting's ratio). Each method uses its paper's recipe (`plrd_jax.methods.pretrain.recipe`: lr, weight decay,
clipping, warmup fraction) scaled to --steps, float32 on CPU (no bfloat16 speed-up on this machine).
Text: WikiText-2 test split by article, the first half (`wikitext2-heal`) for training, the disjoint second half
(`wikitext2-eval`, its first --eval-windows windows in file order) for validation, tokenized with the embedded
parent's (SmolLM2) tokenizer. The model's vocabulary is the set of token ids occurring in either half (18,157 of
49,152, remapped densely and padded to a multiple of 64): the logits layer is the main cost on CPU, and every
method shares the same vocabulary. Ids that occur only in the validation half are in the vocabulary and receive
no training signal, as rare tokens of a real tokenizer would.
CoLA-M is CoLA with remat "bottleneck": the same arithmetic, recomputed. It runs --cola-m-steps steps to measure
its memory and speed and to check that its losses equal CoLA's; its validation perplexity is CoLA's.
Results are kept per method in pretrain_study.json, so a rerun skips finished methods (--fresh starts over).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from plrd_jax.data.windows import load_dataset
from plrd_jax.data.batches import WindowBatches, load_tokenizer
from plrd_jax.methods.pretrain import model_config, parameter_counts, pretrain, recipe
from plrd_jax.reporting.tables import markdown_table, write_csv

# GaLore benchmark (C4, 60M / 130M / 350M / 1B) validation perplexity. Full rank, low rank: GaLore Table 2;
# CoLA, SLTrain: their papers' rows on the same setup as given in docs/methods.md (not re-checked here).
PUBLISHED = {"full": (34.06, 25.08, 18.80, 15.56), "lowrank": (78.18, 45.51, 37.41, 142.53),
             "cola": (34.04, 24.48, 19.40, 15.52), "sltrain": (34.15, 26.04, 19.42, 16.14)}
LABELS = {"full": "full rank", "lowrank": "plain low-rank", "cola": "CoLA", "cola-m": "CoLA-M", "sltrain": "SLTrain"}


def compact(windows: list[np.ndarray], multiple: int = 64):
    """Token ids remapped onto 0..n-1 (n = distinct ids over all windows), n rounded up to `multiple`."""
    ids = np.unique(np.concatenate([w.ravel() for w in windows]))
    table = np.full(int(ids.max()) + 1, -1, np.int32)
    table[ids] = np.arange(len(ids), dtype=np.int32)
    return [table[w] for w in windows], len(ids), -(-len(ids) // multiple) * multiple


def label(key: str) -> str:
    """"full" -> "full rank"; a control "full@0.003" -> "full rank, lr 0.003 (control)"."""
    method, _, lr = key.partition("@")
    return LABELS[method] + (f", lr {lr} (control)" if lr else "")


def run_method(key, args, train, eval_windows, vocab, steps):
    method, _, lr = key.partition("@")
    rcp = recipe("llama-20m", method, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                 dtype="float32", **({"lr": float(lr)} if lr else {}))
    config = model_config("llama-20m", rcp, vocab_size=vocab)
    t0 = time.time()

    def on_event(kind, info):
        if kind == "compiled":
            print(f"[{key}] compiled: peak {info['memory']['peak'] / 2**20:.1f} MiB", flush=True)
        elif kind == "step" and (info["step"] % 10 == 0 or info["step"] == 1):
            print(f"[{key}] step {info['step']}/{steps} loss {info['loss']:.4f} "
                  f"{rcp.tokens_per_step / info['seconds']:.0f} tok/s ({time.time() - t0:.0f}s)", flush=True)
        elif kind == "eval":
            print(f"[{key}] eval at step {info['step']}: PPL {info['ppl']:.2f}", flush=True)

    params, result = pretrain(config, rcp, train, eval_windows, None, seed=args.seed,
                              eval_every=args.eval_every, stop_after=steps if steps < args.steps else None,
                              on_event=on_event)
    step_seconds = [h["seconds"] for h in result.history[1:]]
    return {"method": key, "recipe": rcp.to_dict(), "counts": parameter_counts(params),
            "peak_bytes": result.memory["peak"], "temp_bytes": result.memory["temp"],
            "median_step_s": statistics.median(step_seconds),
            "tokens_per_s": rcp.tokens_per_step / statistics.median(step_seconds),
            "tokens": result.tokens, "eval_ppl": result.eval_ppl, "eval_nll": result.eval_nll,
            "history": [(h["tokens"], h["loss"]) for h in result.history], "evals": result.evals,
            "wall_s": time.time() - t0}


def plot(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    for method, r in results.items():
        tokens, losses = np.array(r["history"]).T
        k = 5
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid") if len(losses) >= k else losses
        style = dict(linestyle="--", linewidth=2.5, alpha=0.7) if method == "cola-m" else {}
        style = dict(linestyle=":") if "@" in method else style
        ax.plot(tokens[len(tokens) - len(smooth):] / 1e3, smooth, label=f"{label(method)} (train, 5-step mean)",
                **style)
        ev = [(e["tokens"] / 1e3, e["nll"]) for e in r["evals"]]
        if method != "cola-m":
            ax.plot(*zip(*ev), marker="o", linestyle="none", color=ax.lines[-1].get_color())
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("cross-entropy (nats); dots: validation")
    ax.set_title("llama-20m shape on WikiText-2 (CPU), equal tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, results, vocab_used, vocab):
    full = results.get("full")
    half = args.steps // 2 if args.eval_every and args.steps // 2 % args.eval_every == 0 else None
    ppl_at = lambda r, step: next((e["ppl"] for e in r["evals"] if e["step"] == step), None)
    rows = []
    keys = [m for m in ("full", "lowrank", "cola", "cola-m", "sltrain") if m in results]
    for key in keys + sorted(k for k in results if "@" in k):
        r = results[key]
        final = results["cola"]["eval_ppl"] if key == "cola-m" and "cola" in results else ppl_at(r, args.steps)
        mid = results["cola"] if key == "cola-m" and "cola" in results else r
        fmt = lambda x: "" if x is None else f"{x:.1f}"
        note = f" (= CoLA: same arithmetic; ran {r['tokens']:,} tokens)" if key == "cola-m" else ""
        rows.append([label(key), f"{r['counts']['total']:,}", f"{r['counts']['matrices']:,}",
                     f"{r['peak_bytes'] / 2**20:.0f}", f"{r['tokens_per_s']:.0f}",
                     fmt(ppl_at(mid, half)) if half else "", fmt(final) + note,
                     f"{final / full['eval_ppl']:.3f}" if full and final else "", f"{r['recipe']['lr']:g}"])
    columns = ["method", "params", "attn+MLP params", "peak MiB (compiled step)", "tokens/s",
               f"val PPL @ {half} steps" if half else "", f"val PPL @ {args.steps} steps", "PPL / full", "peak lr"]
    table = markdown_table(rows, columns)
    write_csv(os.path.join(args.out, "pretrain_study.csv"), rows, columns)
    published = markdown_table([[LABELS[m]] + [f"{x:.2f}" for x in v] for m, v in PUBLISHED.items()],
                               ["method", "60M", "130M", "350M", "1B"])
    tokens = args.steps * args.batch_size * args.seq_len
    text = (f"# CPU-scale pretraining study\n\n"
            f"llama-20m shape (d 256, 4 layers, intermediate 688, untied head), vocabulary {vocab_used:,} ids "
            f"(padded to {vocab:,}), {args.steps} steps × {args.batch_size} × {args.seq_len} = {tokens:,} tokens "
            f"of wikitext2-heal per method, validation on the first {args.eval_windows} windows of wikitext2-eval; "
            f"float32, papers' recipes scaled to the step count; r = 64, SLTrain δ = 0.03, α = 16 (α/r = 1/4 as at "
            f"60M). Controls: the same method and schedule with another peak lr, stopped at the middle evaluation. "
            f"tokens/s: median training step on a 2-core machine shared with other jobs (treat as rough). "
            f"Peak memory: XLA's memory analysis of the compiled train step.\n\n{table}\n"
            f"Loss curves: pretrain_study_loss.png. Command: `python experiments/pretrain_study.py --steps {args.steps} "
            f"--batch-size {args.batch_size} --seq-len {args.seq_len} --eval-every {args.eval_every} "
            f"--eval-windows {args.eval_windows}" + (f" --controls {args.controls}" if args.controls else "") + "`.\n\n"
            f"## Published GaLore-benchmark rows (C4, validation perplexity), which the presets aim at\n\n"
            f"{published}\n")
    with open(os.path.join(args.out, "pretrain_study.md"), "w") as f:
        f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--cola-m-steps", type=int, default=12)
    ap.add_argument("--methods", default="full,lowrank,cola,sltrain,cola-m")
    ap.add_argument("--controls", default="", help="METHOD@LR,...: that method with peak lr LR on the same "
                                                     "schedule, stopped at the middle evaluation (steps / 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "pretrain_study.json")
    settings = {k: v for k, v in vars(args).items() if k not in ("methods", "controls", "fresh", "out")}
    results = {}
    if os.path.exists(store) and not args.fresh:
        saved = json.load(open(store))
        if saved.get("settings") == settings:
            results = saved["results"]

    tokenizer, _ = load_tokenizer("smollm2-135m")
    heal = load_dataset("wikitext2-heal", tokenizer, args.seq_len)
    evaluation = load_dataset("wikitext2-eval", tokenizer, args.seq_len)
    (train_windows, eval_windows), vocab_used, vocab = compact([heal.windows, evaluation.windows])
    train = WindowBatches(train_windows, {**heal.spec, "vocabulary": "compacted"}, seed=args.seed)
    eval_windows = eval_windows[:args.eval_windows]
    print(f"vocabulary {vocab_used} ids (padded {vocab}); {len(train_windows)} training windows, "
          f"{len(eval_windows)} validation windows", flush=True)

    for method in args.methods.split(",") + [c for c in args.controls.split(",") if c]:
        if method in results:
            print(f"[{method}] done earlier: PPL {results[method]['eval_ppl']:.2f}", flush=True)
            continue
        steps = args.cola_m_steps if method == "cola-m" else args.steps // 2 if "@" in method else args.steps
        # CoLA-M's validation perplexity is CoLA's (same arithmetic); a few windows keep its final eval short
        results[method] = run_method(method, args, train, eval_windows[:4] if method == "cola-m" else eval_windows,
                                     vocab, steps)
        with open(store, "w") as f:
            json.dump({"settings": settings, "results": results}, f)
        plot(os.path.join(args.out, "pretrain_study_loss.png"), results)
    if "cola" in results and "cola-m" in results:
        a = [l for _, l in results["cola"]["history"][:args.cola_m_steps]]
        b = [l for _, l in results["cola-m"]["history"]]
        results["cola-m"]["max_loss_diff_vs_cola"] = max(abs(x - y) for x, y in zip(a, b))
        print(f"CoLA-M vs CoLA, first {len(b)} steps: max |Δ loss| = {results['cola-m']['max_loss_diff_vs_cola']:.2e}")
        with open(store, "w") as f:
            json.dump({"settings": settings, "results": results}, f)
    report(args, results, vocab_used, vocab)


if __name__ == "__main__":
    sys.exit(main())
