"""Export sizes and times of a family's members, and their forward speed in transformers (torch, CPU).

    python benchmarks/bench_export.py [--family runs/smollm2-family] [--members 0,1,2,3,4] [--parent smollm2-135m]
                                      [--dtype float32] [--batch 1] [--seq-len 512] [--repeats 3] [--threads 1]
                                      [--work /tmp/bench_export] [--keep] [--out experiments/results/bench_export]

For each member N it exports FAMILY:N twice with `python -m plrd_jax export` semantics (`export_model`): as a
factorized HF directory (`--densify auto`) and densified (`--densify all`, a plain LlamaForCausalLM); and the
parent once. For each directory it records the export time, the weight bytes against the parameter count × dtype
size, and then, loaded with `AutoModelForCausalLM.from_pretrained` (trust_remote_code for the factorized ones),
forward tokens/s on batch × seq-len random tokens (no grad; the member's factorized and densified exports and the
parent timed in alternating rounds, median of `repeats` after one warm-up each, so that a shared machine's load
falls on all three alike). It also
checks the factorized export's logits against plrd_jax's own forward of the member on 64 tokens (max |Δ| over
the logit scale). Writes OUT.json and OUT.md (one row per member: factorized, densified and parent side by side).
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_one(spec: str, out: Path, densify: str, dtype: str) -> dict:
    """Export `spec` to `out`; the export's summary plus its wall time (load + write) and the size check."""
    from plrd_jax.io.export import export_model, load_for_export

    t0 = time.perf_counter()
    config, params, tokenizer, meta = load_for_export(spec)
    summary = export_model(params, config, out, tokenizer=tokenizer, dtype=dtype, densify=densify, force=True,
                           meta=meta, source=spec, command=f"benchmarks/bench_export.py ({spec}, densify {densify})")
    summary["export_s"] = time.perf_counter() - t0
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    summary["bytes_over_params"] = summary["weight_bytes"] / (summary["params"] * size)
    return summary


def load_hf_model(directory: Path) -> tuple[object, float]:
    """(model, load seconds) of an exported directory in transformers, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    return model, time.perf_counter() - t0


def forward_speeds(models: dict, batch: int, seq_len: int, repeats: int, vocab: int) -> dict[str, dict]:
    """Forward tokens/s of each model on the same batch × seq_len random tokens: one warm-up each, then `repeats`
    rounds that time every model once in turn (so that load from other jobs on a shared machine falls on all of
    them alike); the median round per model."""
    import torch

    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(tokens)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(tokens)
                times[name].append(time.perf_counter() - t0)
    return {name: {"forward_s": statistics.median(t), "forward_all_s": t,
                   "tokens_per_s": batch * seq_len / statistics.median(t)} for name, t in times.items()}


def logits_error(spec: str, directory: Path, tokens: int = 64) -> float:
    """max |our logits − transformers' logits| / max |transformers' logits| on `tokens` random ids."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import Decoder

    config, params, _ = load_model(spec)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, tokens))
    ours = np.asarray(Decoder(config).apply({"params": params}, jnp.asarray(ids)), np.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def markdown(rows: list[dict], parent: dict, args) -> str:
    lines = [f"# Exports of {args.family} ({args.dtype}; forward in transformers, torch CPU, {args.threads} threads, "
             f"batch {args.batch} × {args.seq_len} tokens)", "",
             "| member | params | factorized MiB | densified MiB | export s (fact. / dense) "
             "| bytes ÷ (params × size) | factorized tok/s | densified tok/s | parent tok/s | fact. ÷ parent "
             "| logits Δ/scale |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, d = r["factorized"], r["densified"]
        lines.append(f"| {r['member']} | {f['params']:,} | {f['weight_bytes'] / 2**20:.1f} | "
                     f"{d['weight_bytes'] / 2**20:.1f} | {f['export_s']:.1f} / {d['export_s']:.1f} | "
                     f"{f['bytes_over_params']:.4f} | {f['tokens_per_s']:,.0f} | {d['tokens_per_s']:,.0f} | "
                     f"{r['parent']['tokens_per_s']:,.0f} | {f['tokens_per_s'] / r['parent']['tokens_per_s']:.2f}× | "
                     f"{r.get('logits_error', float('nan')):.1e} |")
    lines += ["", f"Parent ({args.parent}): {parent['params']:,} params, {parent['weight_bytes'] / 2**20:.1f} MiB, "
                  f"export {parent['export_s']:.1f} s. Each row's three speeds were timed in alternation "
                  f"(median of {args.repeats} rounds), so each row is a fair side-by-side comparison; rows "
                  f"measured at different times may see different load on a shared machine.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default=str(ROOT / "runs" / "smollm2-family"))
    ap.add_argument("--members", default="0,1,2,3,4")
    ap.add_argument("--parent", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine a descheduled worker thread stalls every parallel "
                         "matmul, so multi-threaded timings measure the other jobs)")
    ap.add_argument("--no-logits-check", action="store_true")
    ap.add_argument("--work", default="/tmp/bench_export", help="where the exports are written (removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_export"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    speed = dict(batch=args.batch, seq_len=args.seq_len, repeats=args.repeats)
    parent = export_one(args.parent, work / "parent", "auto", args.dtype)
    vocab = json.loads((work / "parent" / "config.json").read_text())["vocab_size"]
    parent_model, parent["load_s"] = load_hf_model(work / "parent")
    rows = []
    for n in args.members.split(","):
        spec, row = f"{args.family}:{n}", {"member": n}
        models = {"parent": parent_model}
        for kind, densify in (("factorized", "auto"), ("densified", "all")):
            row[kind] = export_one(spec, work / f"{n}-{kind}", densify, args.dtype)
            models[kind], row[kind]["load_s"] = load_hf_model(work / f"{n}-{kind}")
        speeds = forward_speeds(models, vocab=vocab, **speed)
        for kind in ("factorized", "densified"):
            row[kind].update(speeds[kind])
        row["parent"] = speeds["parent"]
        del models
        gc.collect()
        if not args.no_logits_check:
            row["logits_error"] = logits_error(spec, work / f"{n}-factorized")
        rows.append(row)
        print(f"member {n}: factorized {row['factorized']['tokens_per_s']:,.0f} tok/s, densified "
              f"{row['densified']['tokens_per_s']:,.0f} tok/s, parent {row['parent']['tokens_per_s']:,.0f} tok/s",
              flush=True)
        if not args.keep:
            for kind in ("factorized", "densified"):
                shutil.rmtree(work / f"{n}-{kind}", ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "parent": parent, "members": rows},
                                                   indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, parent, args))
    print(out.with_suffix(".md").read_text())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
