"""Whitening statistics at 7B scale: sharded Gram accumulation, then a streamed whitened factorization with
bounded host memory, on a synthetic checkpoint with LLaMA-2-7B's shapes.

    python benchmarks/whitening_memory.py --layers 2 --rank 1216 [--matrices 'layers_*/mlp/down'] [--devices 4]

1. calibrate (a child process with --devices CPU devices, all on the fsdp axis): the float16 checkpoint of
   benchmarks/streaming_memory.py (d 4096, MLP 11008, vocab 32000, --layers layers) loaded in float32 and
   sharded, `plrd_jax.transforms.calibrate` over --windows random windows of --seq-len tokens. Every XᵀX is
   accumulated in float32 with its rows split across the devices like its kernel's d_in; the table gives each
   matrix's shard shape and bytes per device. The statistics are written with `plrd_jax.io.stats.save_stats`.
2. decompose (a second child, one device): `factorize_streamed(..., decomposition="whitened",
   stats=load_stats(DIR))`: one matrix at a time, its Gram paged in from disk only while it is decomposed; RSS
   sampled every 5 ms per tensor. Stated bound per matrix: 9 float32 buffers of its Gram's size (the Gram, its
   symmetrized, damped and normalized copies, the Cholesky factor, Lᵀ, L⁻ᵀ and the identity it is solved
   against) plus 5 of its kernel's (the kernel, S·K, U, S⁻¹U and the factors), above the fixed overhead; the
   copied tensors after each factorized one show whether memory is left behind. --malloc-trim hands glibc's
   free heap pages back after every tensor. Which input scaling each matrix used (a fallback when its Gram is
   not numerically positive definite: with fewer calibration tokens than inputs it is singular) is reported.

Results: experiments/results/whitening_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def calibrate_child(checkpoint: str, stats_dir: str, windows: int, seq_len: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    from memory import RssSampler, ru_maxrss

    from plrd_jax.io.hf import load_hf
    from plrd_jax.io.stats import save_stats
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.transforms.calibrate import calibrate

    mesh = make_mesh((1, -1, 1))
    with RssSampler() as rss:
        config, params = load_hf(checkpoint, "float32")
        params = jax.device_put(params, param_shardings(params, mesh))  # the host copy is freed
        rss.mark(part="load (float32, sharded)")
        tokens = np.random.default_rng(0).integers(0, config.vocab_size, (windows, seq_len))
        stats = calibrate(config, params, tokens, batch_size=len(mesh.devices.flat), mesh=mesh)
        jax.block_until_ready(stats)
        rss.mark(part="calibrate (sharded)")
        shards = {p: {"shape": list(s.xtx.shape), "shard": list(s.xtx.addressable_shards[0].data.shape),
                      "devices": len(s.xtx.addressable_shards),
                      "bytes_per_device": int(s.xtx.addressable_shards[0].data.nbytes)} for p, s in stats.items()}
        del params
        save_stats(stats, stats_dir)
        rss.mark(part="save statistics")
    Path(out).write_text(json.dumps({"baseline_rss": rss.baseline, "ru_maxrss": ru_maxrss(), "parts": rss.segments,
                                     "shards": shards, "devices": len(mesh.devices.flat),
                                     "tokens": windows * seq_len}, indent=1))


def decompose_child(checkpoint: str, stats_dir: str, family: str, rank: int, matrices: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    from memory import RssSampler, ru_maxrss

    from plrd_jax.io.stats import load_stats
    from plrd_jax.io.streaming import factorize_streamed
    from plrd_jax.transforms.plan import RankPlan

    jax.devices()
    trim = ctypes.CDLL("libc.so.6").malloc_trim if os.environ.get("PLRD_MALLOC_TRIM") else None

    def progress(info):
        rss.mark(**info)
        if trim is not None:  # hand the heap's free pages back to the kernel after each tensor
            trim(0)

    with RssSampler() as rss:
        meta = factorize_streamed(checkpoint, RankPlan(tuple(matrices.split(",")), rank=rank), family,
                                  name=f"whitened-r{rank}", decomposition="whitened", stats=load_stats(stats_dir),
                                  progress=progress)
    Path(out).write_text(json.dumps({"baseline_rss": rss.baseline, "ru_maxrss": ru_maxrss(), "seconds": rss.seconds,
                                     "per_tensor": rss.segments, "member_params": meta["params"],
                                     "decomposition_report": meta["decomposition_report"]}, indent=1))


def report(cal: dict, dec: dict, layers: int, rank: int, matrices: str) -> str:
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.transforms.decompositions import describe_fallbacks

    config = ModelConfig(num_layers=layers)
    param_bytes = 4 * count_params(abstract_params(config))
    stats_bytes = sum(4 * s["shape"][0] ** 2 for s in cal["shards"].values())
    lines = [f"Whitening statistics of a float32 model with LLaMA-2-7B's shapes and {layers} layers, "
             f"{cal['tokens']:,} calibration tokens, on {cal['devices']} CPU devices (fsdp). Every XᵀX is float32 "
             f"with its rows split across the devices:", "",
             "| matrix | XᵀX | shard per device | MiB per device |", "|---|---|---|---|"]
    lines += [f"| {p} | {' × '.join(map(str, s['shape']))} | {' × '.join(map(str, s['shard']))} | "
              f"{s['bytes_per_device'] / MIB:.0f} |" for p, s in cal["shards"].items()]
    base = cal["baseline_rss"]
    lines += ["", f"Calibration process (all {cal['devices']} devices share this host's memory): overhead "
                  f"{base / MIB:.0f} MiB; the parameters take {param_bytes / MIB:.0f} MiB and the statistics "
                  f"{stats_bytes / MIB:.0f} MiB in all ({stats_bytes / cal['devices'] / MIB:.0f} MiB per device).", "",
              "| part | seconds | peak RSS − overhead (MiB) |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['seconds']:.0f} | {(r['peak_rss'] - base) / MIB:.0f} |" for r in cal["parts"]]
    base = dec["baseline_rss"]
    lines += ["", f"Streamed whitened factorization (rank {rank} on {matrices!r}, the rest copied), statistics paged in "
                  f"from disk one matrix at a time; overhead {base / MIB:.0f} MiB. Bound per factorized matrix: "
                  "9 Gram-sized + 5 kernel-sized float32 buffers.", "",
              "| tensor | seconds | input scaling | peak RSS − overhead (MiB) | bound (MiB) | within | "
              "resident after: anonymous / file-backed (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for r in dec["per_tensor"]:
        path = r["tensor"].rsplit("/", 1)[0]
        peak = r["peak_rss"] - base
        after = f"{r['after']['anon'] / MIB:.0f} / {r['after']['file'] / MIB:.0f}" if "after" in r else ""
        if "scaling" in r:
            d_in, d_out = config.matrix_shape(path)
            bound = 4 * (9 * d_in * d_in + 5 * d_in * d_out)
            lines.append(f"| {r['tensor']} | {r['seconds']:.0f} | {r['scaling']} | {peak / MIB:.0f} | "
                         f"{bound / MIB:.0f} | {'yes' if peak < bound else 'NO'} | {after} |")
        else:
            lines.append(f"| {r['tensor']} | {r['seconds']:.0f} | copied | {peak / MIB:.0f} | | | {after} |")
    overall = dec["ru_maxrss"] - base
    fallbacks = describe_fallbacks(dec["decomposition_report"]) or "no whitening fell back"
    lines += ["", f"Overall peak (ru_maxrss) − overhead: {overall / MIB:.0f} MiB; wall {dec['seconds']:.0f} s. "
                  f"Input scalings: " + ", ".join(f"{k} × {v}" for k, v in
                                                  dec["decomposition_report"]["scalings"].items())
              + f"; {fallbacks}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=1216)
    p.add_argument("--matrices", default="layers_*/mlp/down,layers_*/attn/q",
                   help="which matrices to factorize (RankPlan patterns); the rest is copied")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default="/tmp/plrd-stream", help="checkpoint, statistics, family (GBs; deleted after)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "whitening_memory"))
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc's malloc_trim(0) after each tensor (is memory kept between matrices the heap's?)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "calibrate":
            return calibrate_child(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
        return decompose_child(rest[0], rest[1], rest[2], int(rest[3]), rest[4], rest[5])
    sys.path.insert(0, str(Path(__file__).parent))
    from streaming_memory import write_checkpoint

    work = Path(args.work)
    checkpoint = write_checkpoint(work / f"llama2-7b-shapes-{args.layers}l", args.layers)
    stats_dir, family = work / "stats", work / "family-whitened"
    subprocess.run(["rm", "-rf", str(family)], check=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    me = [sys.executable, __file__, "--child"]
    subprocess.run([*me, "calibrate", str(checkpoint), str(stats_dir), str(args.windows), str(args.seq_len),
                    str(work / "calibrate.json")], env=env, check=True)
    env["XLA_FLAGS"] = ""
    if args.malloc_trim:
        env["PLRD_MALLOC_TRIM"] = "1"
    subprocess.run([*me, "decompose", str(checkpoint), str(stats_dir), str(family), str(args.rank), args.matrices,
                    str(work / "decompose.json")], env=env, check=True)
    cal, dec = (json.loads((work / f).read_text()) for f in ("calibrate.json", "decompose.json"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"calibrate": cal, "decompose": dec, "layers": args.layers,
                                                    "rank": args.rank, "matrices": args.matrices}, indent=1))
    table = report(cal, dec, args.layers, args.rank, args.matrices)
    Path(args.out + ".md").write_text(table)
    print(table)
    subprocess.run(["rm", "-rf", str(family), str(stats_dir)], check=True)


if __name__ == "__main__":
    main()
