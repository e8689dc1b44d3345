"""Peak host memory of a streamed factorization (or pruning) on a synthetic checkpoint with LLaMA-2-7B's shapes.

    python benchmarks/streaming_memory.py --layers 2 --rank 1216 [--matrices attn,mlp] [--work /tmp/plrd-stream]
    python benchmarks/streaming_memory.py --layers 2 --prune --out experiments/results/streaming_memory_prune

Writes a float16 HF checkpoint (sharded like transformers': the embedding, one shard per layer, the LM head)
with the shapes of LLaMA-2-7B (d 4096, MLP 11008, vocab 32000) but only `--layers` layers, then factorizes it
with `plrd_jax.io.streaming.factorize_streamed` (with --prune: `prune_streamed` to Sheared-LLaMA-2.7B's widths,
d 2560, 20 heads, intermediate 6912, every kept unit scaled by a mask value in [0.5, 1.5)) in a child process that samples its own RSS (psutil, every
5 ms) and reports the peak per tensor and per layer; ru_maxrss gives the overall peak. The fixed overhead is
the child's RSS after importing jax/orbax and starting the CPU backend, before the first tensor.

Target: peak − overhead < two float32 copies of the largest matrix (the 32000 × 4096 embedding / LM head,
2 × 524 MB = 1000 MiB), in every layer. Results: experiments/results/streaming_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


def write_checkpoint(directory: Path, layers: int, seed: int = 0) -> Path:
    """A float16 LLaMA-2-7B-shaped checkpoint with `layers` layers, one shard per layer (entries N(0, 0.02))."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(ROOT))
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.io.hf import config_to_hf, hf_layout

    config = ModelConfig(num_layers=layers, param_dtype="float16", dtype="float16")
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for name in hf_layout(config):
        group = name.split(".")[2] if name.startswith("model.layers.") else (
            "embed" if "embed" in name else "head")
        groups.setdefault(group, []).append(name)
    order = ["embed", *[str(i) for i in range(layers)], "head"]
    weight_map = {}
    for k, group in enumerate(order, start=1):
        file = f"model-{k:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name in groups[group]:
            shape = hf_layout(config)[name][1]
            tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config_to_hf(config), indent=1))
    return directory


def sheared_masks(layers: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Masks that prune LLaMA-2-7B's widths to Sheared-LLaMA-2.7B's (random kept units and mask values)."""
    rng = np.random.default_rng(seed)

    def keep(shape, n):
        z = np.zeros(shape, np.float32)
        for row in z.reshape(-1, shape[-1]):
            row[rng.choice(shape[-1], n, replace=False)] = rng.uniform(0.5, 1.5, n)
        return z
    return {"z_hidden": keep((4096,), 2560), "z_head": keep((layers, 32), 20), "z_int": keep((layers, 11008), 6912)}


def child(checkpoint: str, family: str, rank: int, matrices: str, out: str, prune: bool = False) -> None:
    """Runs in its own process: the measurement itself."""
    sys.path.insert(0, str(ROOT))
    import jax
    from memory import RssSampler, ru_maxrss

    from plrd_jax.io.streaming import factorize_streamed, prune_streamed
    from plrd_jax.transforms.plan import RankPlan

    jax.devices()
    plan = RankPlan(tuple(matrices.split(",")), rank=rank) if rank else {}  # rank 0: copy only (the I/O path)
    with RssSampler() as rss:
        progress = lambda info: rss.mark(tensor=info["tensor"], layer=info["layer"])  # noqa: E731
        if prune:
            layers = json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"]
            meta = prune_streamed(checkpoint, sheared_masks(layers), family, name="sheared-widths", progress=progress)
        else:
            meta = factorize_streamed(checkpoint, plan, family, name=f"r{rank}", progress=progress)
    result = {"baseline_rss": rss.baseline, "ru_maxrss": ru_maxrss(), "sampled_peak_rss": rss.peak,
              "seconds": rss.seconds, "per_tensor": rss.segments, "member_params": meta["params"], "rank": rank,
              "prune": prune}
    Path(out).write_text(json.dumps(result, indent=1))


def report(result: dict, layers: int) -> str:
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.io.hf import hf_layout

    config = ModelConfig(num_layers=layers)
    sizes = sorted((int(np.prod(shape)) * 4 for _, shape, _ in hf_layout(config).values()), reverse=True)
    bound = sizes[0] + sizes[1]
    base = result["baseline_rss"]
    by_layer: dict[str, list[dict]] = {}
    for row in result["per_tensor"]:
        by_layer.setdefault(row["layer"], []).append(row)
    what = (f"factorization (rank {result['rank']} on the matrices matching {result['matrices']!r}, the rest copied)"
            if result["rank"] else "factorization (every tensor copied)")
    if result.get("prune"):
        what = ("pruning (to Sheared-LLaMA-2.7B's widths: d 2560, 20 heads, intermediate 6912, kept units scaled by "
                "their mask values)")
    lines = [f"Streamed {what} of a float16 "
             f"checkpoint with LLaMA-2-7B's shapes and {layers} layers; float32 member of "
             f"{result['member_params']:,} params. Fixed overhead (RSS after imports and backend start): "
             f"{base / MIB:.0f} MiB. Bound: two float32 copies of the largest matrix = {bound / MIB:.0f} MiB "
             f"above the overhead.", "",
             "| part | tensors | seconds | peak RSS − overhead (MiB) | within bound |", "|---|---|---|---|---|"]
    for layer, rows in by_layer.items():
        peak = max(r["peak_rss"] for r in rows) - base
        lines.append(f"| {layer} | {len(rows)} | {sum(r['seconds'] for r in rows):.0f} | {peak / MIB:.0f} | "
                     f"{'yes' if peak < bound else 'NO'} |")
    overall = result["ru_maxrss"] - base
    lines += ["", f"Overall peak (ru_maxrss) − overhead: {overall / MIB:.0f} MiB "
                  f"({'within' if overall < bound else 'ABOVE'} the {bound / MIB:.0f} MiB bound); "
                  f"wall time {result['seconds']:.0f} s on a shared 2-core CPU.", ""]
    lines += ["Every tensor, in the order streamed (peak: sampled while it was processed; high-water: ru_maxrss after "
              "it, which would grow if memory accumulated):", "",
              "| tensor | seconds | peak RSS − overhead (MiB) | high-water − overhead (MiB) |", "|---|---|---|---|"]
    lines += [f"| {r['tensor']} | {r['seconds']:.0f} | {(r['peak_rss'] - base) / MIB:.0f} | "
              f"{(r['ru_maxrss_after'] - base) / MIB:.0f} |" for r in result["per_tensor"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=1216)
    p.add_argument("--work", default="/tmp/plrd-stream", help="checkpoint and family store (GBs; deleted after)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "streaming_memory"))
    p.add_argument("--matrices", default="attn,mlp",
                   help="which matrices to factorize (RankPlan patterns, e.g. 'layers_*/mlp/down'); the rest is copied")
    p.add_argument("--prune", action="store_true", help="measure prune_streamed instead of factorize_streamed")
    p.add_argument("--child", nargs=5, metavar=("CHECKPOINT", "FAMILY", "RANK", "MATRICES", "OUT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        checkpoint, family, rank, matrices, out = args.child
        return child(checkpoint, family, int(rank), matrices, out, args.prune)
    work = Path(args.work)
    checkpoint = write_checkpoint(work / f"llama2-7b-shapes-{args.layers}l", args.layers)
    family = work / "family"
    subprocess.run(["rm", "-rf", str(family)], check=True)
    raw = work / "result.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, __file__, "--child", str(checkpoint), str(family), str(args.rank),
                    args.matrices, str(raw), *(["--prune"] if args.prune else [])], env=env, check=True)
    result = json.loads(raw.read_text())
    result.update(layers=args.layers, matrices=args.matrices)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    table = report(result, args.layers)
    Path(args.out + ".md").write_text(table)
    print(table)
    subprocess.run(["rm", "-rf", str(family)], check=True)


if __name__ == "__main__":
    main()
