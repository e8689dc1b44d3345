"""Forward throughput of our decoder against HF transformers (torch, CPU) on the same parent, side by side.

    python benchmarks/bench_forward.py [--batch 1] [--seq-len 512] [--repeats 5] [--dtype float32]

Both load the embedded parent's GGUF; both run the whole forward (logits included) on the same token batch,
alternating, after warm-up; tokens/s is batch·seq_len / median time. torch gets as many threads as XLA's CPU
client uses (all cores). The script restarts itself once with glibc malloc keeping freed memory
(`timing.KEEP_FREED_MEMORY`); run it with GLIBC_TUNABLES= to time with glibc's defaults.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from timing import keep_freed_memory, round_robin_medians

# Both run in turns in this process: torch's OpenMP workers would otherwise spin after each of its ops and take
# the cores from plrd_jax's turn. Set before torch is imported; sleeping workers did not slow torch here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    keep_freed_memory()  # restarts this script once, with malloc keeping freed memory (see timing.py)

    import torch
    from transformers import AutoModelForCausalLM

    from plrd_jax.io.load import embedded_path, load_model
    from plrd_jax.nn.model import Decoder

    config, params, _ = load_model(args.model, dtype=args.dtype)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    if args.dtype != config.param_dtype:
        params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    forward = jax.jit(lambda p, t: Decoder(config).apply({"params": p}, t))
    x = jnp.asarray(tokens)
    forward(params, x).block_until_ready()
    ours = lambda: forward(params, x).block_until_ready()

    path = str(embedded_path(args.model))
    torch.set_num_threads(os.cpu_count())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=dtype).eval()
    t_tokens = torch.from_numpy(tokens.astype(np.int64))

    def theirs():
        with torch.inference_mode():
            hf(t_tokens).logits

    theirs()
    ours(), theirs()
    seconds = round_robin_medians({"ours": ours, "theirs": theirs}, rounds=args.repeats)
    n = args.batch * args.seq_len
    result = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq_len,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
              "plrd_jax_tokens_per_s": n / seconds["ours"], "torch_tokens_per_s": n / seconds["theirs"]}
    result["ratio"] = result["plrd_jax_tokens_per_s"] / result["torch_tokens_per_s"]
    print(f"| {args.model} {args.dtype} {args.batch}×{args.seq_len} | plrd_jax {result['plrd_jax_tokens_per_s']:.0f} "
          f"tok/s | HF torch {result['torch_tokens_per_s']:.0f} tok/s | ratio {result['ratio']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
