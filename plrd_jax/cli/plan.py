"""`plan`: compile a family preset's heal steps ahead of time for a slice and say whether they fit."""
from __future__ import annotations

import os
import sys

from plrd_jax.cli.common import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="compile a family's heal steps for a TPU/GPU slice from shapes alone: "
                                           "memory per device, FLOPs, step time at peak, fits or not")
    p.add_argument("--preset", default="plrd", help="a family preset (plrd_jax/configs/family/)")
    p.add_argument("--model", default=None,
                   help="the parent's shapes: a model preset (plrd_jax/configs/models/: smollm2-135m, llama2-7b, "
                        "mistral-7b) or an HF directory's config.json (default: the preset's parent)")
    p.add_argument("--topology", default="v5e-8", help="v5e-8, v5p-8, v4-8 or 8xh100")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor over the slice's chips (-1: the rest)")
    p.add_argument("--members", default=None, help="member indices to plan, e.g. 0,2 (default all)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default the preset's)")
    p.add_argument("--grad-accum", type=positive_int, default=None)
    p.add_argument("--remat", choices=["none", "full", "dots"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="compute dtype")
    p.set_defaults(func=run)


PARENTS = {"mistral-7b-3.1b": "mistral-7b", "llama2-7b-3.3b": "llama2-7b"}


def parent_config(args, preset: str):
    from plrd_jax.configs import build, load_config, load_preset
    from plrd_jax.io.hf import config_from_hf, read_json
    from plrd_jax.nn.config import ModelConfig

    name = args.model or PARENTS.get(preset, "smollm2-135m")
    if os.path.isdir(name):
        return config_from_hf(read_json(os.path.join(name, "config.json")))
    if name.endswith((".toml", ".json")):
        return build(ModelConfig, load_config(name), name)
    return build(ModelConfig, load_preset("models", name), f"models/{name}.toml")


def member_configs(parent, schedule) -> list:
    """Each stage's member shapes, as the family would make them (ranks from shapes alone)."""
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.config import LinearSpec
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.transforms.plan import resolve_ranks

    parent_count, source, out = count_params(abstract_params(parent)), parent, []
    for stage in schedule.stages:
        shapes = abstract_params(source)
        ranks = resolve_ranks(shapes, stage.plan(parent_count, schedule.matrices, schedule.multiple_of))
        member = source.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
        out.append(member)
        source = member if schedule.progressive else parent
    return out


def run(args) -> None:
    import jax

    from plrd_jax.methods.plrd import PRESETS
    from plrd_jax.training.aot import accelerator, check_mesh

    slice_ = accelerator(args.topology)
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    schedule = PRESETS[args.preset]
    mesh = tuple(int(x) for x in args.mesh.split(","))
    parent = parent_config(args, args.preset).replace(dtype=args.dtype, remat=args.remat or "none")
    batch = args.batch_size or schedule.batch_size
    accum = args.grad_accum or schedule.heal.grad_accum
    if batch % accum:
        raise ValueError(f"--batch-size {batch} is not a multiple of --grad-accum {accum}")
    check_mesh(parent, mesh, slice_.chips, batch // accum)  # one-line errors before any compile
    if jax.device_count() < slice_.chips:  # re-run with as many host CPU devices as the slice has chips
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                          f"--xla_force_host_platform_device_count={slice_.chips}".strip(),
               "JAX_PLATFORMS": "cpu"}
        os.execve(sys.executable, [sys.executable, "-m", "plrd_jax", *sys.argv[1:]], env)
    _plan_members(args, schedule, parent, batch, slice_, mesh)


def _plan_members(args, schedule, parent, batch, slice_, mesh) -> None:
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.reporting.tables import markdown_table
    from plrd_jax.training.aot import plan_heal_step

    heal = schedule.heal.replace(dtype=args.dtype, **({"grad_accum": args.grad_accum} if args.grad_accum else {}))
    teacher = parent if heal.kd_weight > 0 else None
    members = member_configs(parent, schedule)
    chosen = range(len(members)) if args.members is None else [int(x) for x in args.members.split(",")]
    gib, rows = 1024 ** 3, []
    print(f"{args.preset} on {slice_.name} ({slice_.chips} chips, {slice_.hbm_bytes / gib:.1f} GiB each; "
          f"{slice_.source}); mesh {mesh}, batch {batch} × {schedule.seq_len}, grad_accum {heal.grad_accum}, "
          f"{args.dtype}; compiled for {slice_.chips} host CPU devices", flush=True)
    for k in chosen:
        config = members[k]
        plan = plan_heal_step(config, heal, batch, schedule.seq_len, slice_, mesh, teacher)
        h = plan["heal"]
        rows.append([str(k), schedule.stages[k].name, f"{count_params(abstract_params(config)) / 1e9:.2f}B",
                     f"{h['argument'] / gib:.2f}", f"{h['temp'] / gib:.2f}", f"{h['peak'] / gib:.2f}",
                     "yes" if h["fits"] else "no", f"{h['flops'] / 1e12:.1f}", f"{plan['step_s_at_peak']:.2f}",
                     plan["suggestion"]])
        print(" | ".join(rows[-1]), flush=True)
    columns = ["member", "name", "params", "args GiB/device", "temp GiB/device", "peak GiB/device", "fits",
               "TFLOP/device (XLA, one micro-batch)", "step s at peak (model FLOPs)", "to fit"]
    print(markdown_table(rows, columns))
