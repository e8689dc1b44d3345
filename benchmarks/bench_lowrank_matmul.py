"""Is the low-rank speed-up real at the level of the matmuls? One layer's q, k, v, gate and up projections of the
embedded parent's shapes (d 576, k/v 192, MLP 1536) for 4 × 256 tokens, dense against factorized (x A) B at
uniform rank r, float32, each jitted; speed-up against the FLOP ratio.

    python benchmarks/bench_lowrank_matmul.py [--tokens 1024] [--ranks 96,128,160] [--json OUT]

The whole-model latency of members (bench_heal.py) also pays for work that factorizing does not shrink (norms,
rotary embeddings, attention scores and softmax, activations, the LM head); this isolates the matmuls.
Median of 15 runs after warm-up, with malloc keeping freed memory (`timing.KEEP_FREED_MEMORY`).
"""
from __future__ import annotations

import argparse
import json
import jax
import jax.numpy as jnp
import numpy as np
from timing import keep_freed_memory, median_seconds

from plrd_jax.reporting.tables import markdown_table

SHAPES = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "gate": (576, 1536), "up": (576, 1536)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ranks", default="96,128,160")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    keep_freed_memory()  # restarts this script once, with malloc keeping freed memory (see timing.py)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.tokens, 576)), jnp.float32)
    kernels = {k: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32) for k, s in SHAPES.items()}
    t_dense = median_seconds(jax.jit(lambda x, w: [x @ w[k] for k in SHAPES]), x, kernels, repeats=15, warmup=1)
    dense_flops = sum(2 * args.tokens * a * b for a, b in SHAPES.values())
    rows = []
    for r in [int(v) for v in args.ranks.split(",")]:
        a = {k: jnp.asarray(rng.standard_normal((s[0], r)) * 0.02, jnp.float32) for k, s in SHAPES.items()}
        b = {k: jnp.asarray(rng.standard_normal((r, s[1])) * 0.02, jnp.float32) for k, s in SHAPES.items()}
        t = median_seconds(jax.jit(lambda x, a, b: [(x @ a[k]) @ b[k] for k in SHAPES]), x, a, b, repeats=15,
                           warmup=1)
        ratio = dense_flops / sum(2 * args.tokens * r * (d_in + d_out) for d_in, d_out in SHAPES.values())
        rows.append({"rank": r, "flop_ratio": ratio, "speedup": t_dense / t, "speedup_over_flop_ratio": t_dense / t / ratio})
    print(f"dense projections: {t_dense * 1e3:.1f} ms ({dense_flops / t_dense / 1e9:.0f} GFLOP/s)")
    print(markdown_table([[str(r["rank"]), f"{r['flop_ratio']:.2f}", f"{r['speedup']:.2f}",
                           f"{r['speedup_over_flop_ratio']:.2f}"] for r in rows],
                         ["rank", "FLOP ratio", "speed-up", "speed-up / FLOP ratio"]), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "dense_seconds": t_dense, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
