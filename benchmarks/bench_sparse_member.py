"""Forward latency of a sparse-plus-low-rank member (A B + S) of the embedded parent by each way of applying S,
against the dense parent: what the gather default (no dense matrix, ever) costs on this CPU.

    python benchmarks/bench_sparse_member.py [--fraction 0.3] [--density 0.02] [--tokens 512]

Member: every attention and MLP matrix at rank fraction · min(d_in, d_out) (k/v only where it saves) plus S at
--density on the top-|residual| support; one sequence of --tokens tokens, float32, median of 5 after warm-up.
"""
from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()

    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import Decoder
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.reporting.tables import markdown_table
    from plrd_jax.transforms.plan import RankPlan
    from plrd_jax.transforms.plan import resolve_ranks
    from plrd_jax.transforms.sparse import sparse_plus_lowrank

    config, params, _ = load_model("smollm2-135m")
    ranks = resolve_ranks(params, RankPlan(("attn", "mlp"), fraction=args.fraction))
    member, member_config = sparse_plus_lowrank(params, ranks, config, density=args.density)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, args.tokens)), jnp.int32)
    forward = lambda cfg: jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))  # noqa: E731
    parent_s = median_seconds(forward(config), params, tokens, warmup=1)
    print(f"member: {count_params(member) / count_params(params):.1%} of the parent's parameters, "
          f"S at density {args.density}; 1 × {args.tokens} tokens, float32")
    rows = []
    for method in ("gather", "auto", "scatter"):
        s = median_seconds(forward(member_config.replace(sparse_method=method)), member, tokens, warmup=1)
        rows.append([method, f"{s:.3f}", f"{s / parent_s:.2f}×"])
    rows.append(["(dense parent)", f"{parent_s:.3f}", "1.00×"])
    print(markdown_table(rows, ["S applied by", "forward s", "vs dense parent"]), end="")


if __name__ == "__main__":
    main()
