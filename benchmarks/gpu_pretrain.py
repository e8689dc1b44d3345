"""The GaLore-benchmark pretraining presets (full rank, CoLA, SLTrain) run for real on one accelerator in bfloat16:
tokens/s, model FLOP utilization, compiled peak memory and the validation perplexity after a short run.

    PLRD_SHARED_DATA=DIR python benchmarks/gpu_pretrain.py --tokenizer TOKENIZER_DIR [--presets llama-60m]
        [--methods full,cola,sltrain] [--steps 80] [--batch-size 256] [--seq-len 256] [--peak-tflops 989]
        [--json OUT]

Each (preset, method) is `plrd_jax.methods.pretrain.pretrain` with the method's published recipe (lr, warmup, weight
decay, clipping) scaled to --steps, float32 master weights and bfloat16 compute, batches of --batch-size windows of
wikitext2-heal, validation on the first 64 windows of the disjoint wikitext2-eval. The tokenizer is the one of
the embedded parent (SmolLM2, 49,152 ids; GaLore's T5 tokenizer needs the Hugging Face hub). WikiText-2's heal
half is about 150k tokens, so a run of many steps repeats it: the perplexity shows the run is real and healthy,
not what the preset reaches on C4. tokens/s: all steps but the first (which pays for warming up); MFU = tokens/s ·
`model_flops_per_token` / --peak-tflops (an H100/H200 SXM's dense bf16 datasheet peak: 989).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory or name (see plrd_jax pretrain)")
    ap.add_argument("--presets", default="llama-60m")
    ap.add_argument("--methods", default="full,cola,sltrain")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from plrd_jax.data.corpora import DataError
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.data.batches import WindowBatches, load_tokenizer
    from plrd_jax.methods.pretrain import PretrainError, model_config, pretrain, recipe
    from plrd_jax.reporting.tables import markdown_table
    from plrd_jax.nn.accounting import model_flops_per_token

    try:  # every preset, method and input checked before the first run
        runs = [(preset, method, recipe(preset, method, steps=args.steps, batch_size=args.batch_size,
                                        seq_len=args.seq_len, dtype=args.dtype))
                for preset in args.presets.split(",") for method in args.methods.split(",")]
        tokenizer, vocab = load_tokenizer(args.tokenizer)
        train = load_dataset("wikitext2-heal", tokenizer, args.seq_len)
        evaluation = load_dataset("wikitext2-eval", tokenizer, args.seq_len, max_windows=args.eval_windows)
    except (PretrainError, DataError) as err:
        raise SystemExit(f"error: {err}") from None
    rows = []
    for preset, method, rcp in runs:
        config = model_config(preset, rcp, vocab_size=vocab)
        t0 = time.perf_counter()
        _, r = pretrain(config, rcp, WindowBatches(train.windows, train.spec), evaluation.windows,
                        eval_batch_size=32)
        flops = model_flops_per_token(config, args.seq_len, training=True)
        rows.append({"preset": preset, "method": method, "params": r.params, "steps": r.steps,
                     "tokens": r.tokens, "tokens_per_s": r.tokens_per_s,
                     "mfu": r.tokens_per_s * flops / (args.peak_tflops * 1e12),
                     "peak_gib": r.memory["peak"] / 2**30, "first_loss": r.history[0]["loss"],
                     "last_loss": r.history[-1]["loss"], "eval_ppl": r.eval_ppl,
                     "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    device = jax.devices()[0].device_kind
    print(f"{args.dtype}, {args.batch_size} × {args.seq_len} tokens per step, {args.steps} steps, on {device}")
    print(markdown_table([[r["preset"], r["method"], f"{r['params'] / 1e6:.1f}M", f"{r['tokens_per_s']:,.0f}",
                           f"{100 * r['mfu']:.1f}%", f"{r['peak_gib']:.2f}",
                           f"{r['first_loss']:.2f} → {r['last_loss']:.2f}", f"{r['eval_ppl']:.1f}"] for r in rows],
                         ["preset", "method", "params", "tokens/s", "MFU", "peak GiB", "loss first → last",
                          "val PPL"]), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": args.seq_len,
                       "steps": args.steps, "peak_tflops": args.peak_tflops, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
