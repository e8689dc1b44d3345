"""Compile time and step time of one member's heal step, layers scanned against unrolled, side by side.

    python benchmarks/bench_compile.py [--model smollm2-135m] [--fractions 0.9,0.5] [--batch 4] [--seq-len 256]
                                       [--steps 5] [--out experiments/results/bench_compile]

For each member size (the budget plan's member at that fraction of the parent's parameters, the main job's
shape) and each layout — unrolled (one subtree per layer) and scanned (params stored stacked,
`nn.layout.stack_layers`, as `family` runs them) — lowers and compiles the healing step ahead of time
(`make_heal_step`, distilling from the parent as the main job does) from abstract parameters and times
lowering and compiling separately; then, with `--steps N`, runs N steps on random weights of those shapes and
reports the median step after the first. The persistent compilation cache is off here, so every compile is
cold. Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compile_seconds(config, parent_config, batch: int, seq_len: int, steps: int = 0) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from plrd_jax.nn.model import abstract_params, init_params
    from plrd_jax.training.state import init_train_state
    from plrd_jax.nn.sharding import make_mesh, param_shardings
    from plrd_jax.training.loop import state_layout
    from plrd_jax.training.optim import HealConfig, make_optimizer
    from plrd_jax.training.step import make_heal_step

    jax.clear_caches()
    heal = HealConfig(lr=2e-4, warmup_steps=2, total_steps=8, kd_weight=0.5)
    mesh = make_mesh()
    shardings = param_shardings(abstract_params(config), mesh)
    layout = state_layout(abstract_params(config), make_optimizer(heal), mesh, shardings)
    teacher = abstract_params(parent_config, param_shardings(abstract_params(parent_config), mesh))
    step = make_heal_step(config, heal, mesh, shardings, teacher=parent_config)
    tokens = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    t0 = time.perf_counter()
    lowered = step.lower(layout, tokens, teacher)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    if steps:
        state = init_train_state(init_params(config), heal, mesh, shardings)
        teacher_params = jax.device_put(init_params(parent_config, 1), jax.tree.map(lambda s: s.sharding, teacher))
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps):
            batch_tokens = rng.integers(0, config.vocab_size, (1, batch, seq_len)).astype(np.int32)
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch_tokens, teacher_params)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        out["first_step_s"] = times[0]  # XLA:CPU finishes some of its work when a program first runs
        out["step_s"] = float(np.median(times[1:] if len(times) > 1 else times))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fractions", default="0.9,0.5")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="steps run per layout on random weights (0: compile only)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_compile"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax

    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.config import LinearSpec
    from plrd_jax.nn.layout import layer_runs
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.reporting.tables import markdown_table
    from plrd_jax.transforms.plan import RankPlan, resolve_ranks

    parent_config, params, _ = load_model(args.model)
    del params
    shapes = abstract_params(parent_config)
    rows, results = [], []
    for fraction in (float(f) for f in args.fractions.split(",")):
        ranks = resolve_ranks(shapes, RankPlan(("attn", "mlp"), budget=int(fraction * count_params(shapes))))
        member = parent_config.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
        timings = {}
        for layout, scan in (("unrolled", False), ("scanned", True)):
            config = member.replace(scan_layers=scan)
            timings[layout] = compile_seconds(config, parent_config.replace(scan_layers=scan), args.batch,
                                              args.seq_len, args.steps)
        runs = len(layer_runs(member))
        results.append({"fraction": fraction, "scan_runs": runs, **timings})
        u, s = timings["unrolled"], timings["scanned"]
        rows.append([f"{round(fraction * 100)} %", str(runs), f"{u['lower_s']:.1f}", f"{u['compile_s']:.1f}",
                     f"{s['lower_s']:.1f}", f"{s['compile_s']:.1f}",
                     f"{(u['lower_s'] + u['compile_s']) / (s['lower_s'] + s['compile_s']):.1f}×"]
                    + ([f"{u['first_step_s']:.1f}", f"{s['first_step_s']:.1f}", f"{u['step_s']:.2f}",
                        f"{s['step_s']:.2f}", f"{u['step_s'] / s['step_s']:.2f}×"]
                       if args.steps else []))
        print(rows[-1], flush=True)
    columns = ["member", "scanned runs of layers", "unrolled lower s", "unrolled compile s", "scanned lower s",
               "scanned compile s", "compile speed-up"] + (
        ["unrolled first step s", "scanned first step s", "unrolled step s", "scanned step s", "step speed-up"]
        if args.steps else [])
    text = (f"Heal step of each member (batch {args.batch} × {args.seq_len}, distilling from the parent), lowered "
            f"and compiled ahead of time on {jax.device_count()} {jax.default_backend()} device(s), "
            f"{os.cpu_count()} cores, no compilation cache. Command: `python benchmarks/bench_compile.py "
            f"--fractions {args.fractions} --steps {args.steps}`. "
            f"First step: the first call of the compiled step; step: median of the steps after it, {args.steps} "
            f"in all, on random weights.\n\n" + markdown_table(rows, columns) + "\n")
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
