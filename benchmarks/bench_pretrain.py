"""Pretraining costs on this machine: SLTrain's two sparse paths per shape, and each remat policy's compiled peak
memory and step time (CoLA-M = CoLA with remat "bottleneck").

    python benchmarks/bench_pretrain.py [--out experiments/results] [--rounds 3] [--batch 8] [--seq-len 256]
        [--vocab-size 18176] [--skip-sparse] [--skip-remat]

Sparse: forward + backward of y = x((α/r) A B + S), r = d_in/4, δ = 0.03, through "scatter" (S scattered into a
dense (α/r) A B, one matmul) and "gather" (gather x's rows, segment-sum into columns), for token counts from
decoding (1) to a training micro-batch (2048); which is faster, and whether "auto"
(`plrd_jax.nn.linears.choose_sparse_method`) picks it. Gather at tokens × nnz > 2·10⁸ is skipped (its (nnz, tokens)
temporaries alone would need gigabytes).
Remat: the full train step (`plrd_jax.training.step.make_heal_step`, AdamW, float32) of the CPU-study model (llama-20m shape:
d 256, 4 layers, intermediate 688, untied head; --vocab-size defaults to the study's compacted vocabulary) per
method and policy; peak = arguments + outputs + temporaries − donated, from XLA's memory analysis of the compiled
step (with XLA:CPU's barrier-expanding pass off, see `plrd_jax.methods.pretrain.compiler_options`); step time = median over
--rounds rounds that visit every configuration once each (interleaved, so load from other processes on a shared
machine spreads over all of them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from plrd_jax.nn.linears import choose_sparse_method, sltrain_matmul, sparse_support
from plrd_jax.methods.pretrain import init_params, model_config, recipe
from plrd_jax.training.compile import compile_train_step
from plrd_jax.reporting.tables import markdown_table, write_csv
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.training.state import init_train_state


def table(rows):
    return markdown_table([[str(v) for v in r.values()] for r in rows], list(rows[0]))


def csv_rows(path, rows):
    write_csv(path, [[str(v) for v in r.values()] for r in rows], list(rows[0]))


def best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def bench_sparse(tokens_list=(1, 16, 256, 2048), shapes=((256, 688), (512, 512), (512, 1376), (1024, 2736))):
    rows = []
    for d_in, d_out in shapes:
        r, nnz = d_in // 4, int(0.03 * d_in * d_out)
        keys = jax.random.split(jax.random.key(0), 5)
        a, b = jax.random.normal(keys[0], (d_in, r)), jax.random.normal(keys[1], (r, d_out))
        values, indices = jax.random.normal(keys[2], (nnz,)), sparse_support(keys[3], d_in, d_out, nnz)
        for tokens in tokens_list:
            x = jax.random.normal(keys[4], (tokens, d_in))
            ms = {}
            for method in ("scatter", "gather"):
                if method == "gather" and tokens * nnz > 2e8:
                    continue
                loss = lambda x, a, b, v, m=method: jnp.sum(sltrain_matmul(x, a, b, v, indices, 0.5, m) ** 2)
                step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
                jax.block_until_ready(step(x, a, b, values))
                ms[method] = 1e3 * best_of(lambda: step(x, a, b, values))
            faster = min(ms, key=ms.get)
            auto = choose_sparse_method(tokens, d_in, d_out, r, nnz)
            rows.append({"d_in × d_out": f"{d_in}×{d_out}", "r": r, "nnz": nnz, "tokens": tokens,
                         "scatter ms": round(ms["scatter"], 3),
                         "gather ms": round(ms["gather"], 3) if "gather" in ms else "skipped",
                         "faster": faster, "auto picks": auto, "auto right": auto == faster})
            print(rows[-1], flush=True)
    return rows


REMAT_CASES = [("full", "none"), ("full", "full"), ("full", "dots"),
               ("lowrank", "none"), ("lowrank", "bottleneck"),
               ("cola", "none"), ("cola", "full"), ("cola", "dots"), ("cola", "bottleneck"),
               ("sltrain", "none"), ("sltrain", "full"), ("sltrain", "dots")]


def bench_remat(batch, seq_len, vocab_size, rounds):
    mesh = make_mesh()
    runs = []
    for method, remat in REMAT_CASES:
        rcp = recipe("llama-20m", method, remat=remat, batch_size=batch, seq_len=seq_len, dtype="float32", steps=1000)
        config = model_config("llama-20m", rcp, vocab_size=vocab_size)
        params = init_params(config)
        shardings = param_shardings(params, mesh)
        heal = rcp.heal_config()
        state = init_train_state(params, heal, mesh, shardings)
        t = time.perf_counter()
        compiled, memory = compile_train_step(config, heal, batch, seq_len, mesh, shardings, state)
        compile_s = time.perf_counter() - t
        tokens = np.random.default_rng(0).integers(0, vocab_size, (1, batch, seq_len)).astype(np.int32)
        state, metrics = compiled(state, tokens, None)  # warm-up
        jax.block_until_ready(metrics)
        runs.append({"method": method, "remat": remat, "compiled": compiled, "state": state, "tokens": tokens,
                     "memory": memory, "compile_s": compile_s, "times": []})
        print(method, remat, f"peak {memory['peak'] / 2**20:.1f} MiB", flush=True)
    for _ in range(rounds):
        for run in runs:
            t = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], run["tokens"], None)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - t)
    rows = []
    base = {}
    for run in runs:
        step_s = statistics.median(run["times"])
        key = run["method"]
        if run["remat"] == "none":
            base[key] = (run["memory"]["peak"], step_s)
        peak0, step0 = base[key]
        rows.append({"method": key, "remat": run["remat"], "peak MiB": round(run["memory"]["peak"] / 2**20, 1),
                     "temp MiB": round(run["memory"]["temp"] / 2**20, 1),
                     "peak vs none": f"{run['memory']['peak'] / peak0:.2f}×",
                     "step s (median)": round(step_s, 3), "step vs none": f"{step_s / step0:.2f}×",
                     "tokens/s": round(batch * seq_len / step_s), "compile s": round(run["compile_s"], 1)})
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=18176)
    ap.add_argument("--skip-sparse", action="store_true")
    ap.add_argument("--skip-remat", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    header = (f"# Pretraining benchmark\n\n{jax.device_count()} × {jax.devices()[0].device_kind}, "
              f"{os.cpu_count()} CPU cores (shared with other jobs: load average "
              f"{os.getloadavg()[0]:.1f} at the start), jax {jax.__version__}.\n\n")
    if not args.skip_sparse:
        rows = bench_sparse()
        csv_rows(os.path.join(args.out, "pretrain_bench_sparse.csv"), rows)
        with open(os.path.join(args.out, "pretrain_bench_sparse.md"), "w") as f:
            f.write(header + "SLTrain's sparse part, scatter-into-dense vs gather/segment-sum (forward + backward, "
                    "float32, best of 5)\n\n" + table(rows))
    if not args.skip_remat:
        rows = bench_remat(args.batch, args.seq_len, args.vocab_size, args.rounds)
        csv_rows(os.path.join(args.out, "pretrain_bench_remat.csv"), rows)
        with open(os.path.join(args.out, "pretrain_bench_remat.md"), "w") as f:
            f.write(header + f"Remat policies: compiled peak memory and step time of the train step (batch "
                    f"{args.batch} × {args.seq_len}, vocab {args.vocab_size}, float32, median of {args.rounds} "
                    "interleaved rounds)\n\n" + table(rows))
    print(f"wrote {args.out}/pretrain_bench_*.md")


if __name__ == "__main__":
    main()
