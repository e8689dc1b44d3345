"""`plan`: compile a preset's steps ahead of time for a slice and say whether they fit: a family preset's heal
and evaluation steps per member, a Sheared preset's pruning, continued-training and evaluation steps."""
from __future__ import annotations

import os
import sys
from functools import partial

from plrd_jax.cli.common import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="compile a preset's heal, prune and eval steps for a TPU/GPU slice from "
                                           "shapes alone: memory per device, FLOPs, step time at peak, fits or not")
    p.add_argument("--preset", default="plrd",
                   help="a family preset (plrd_jax/configs/family/) or a Sheared one (plrd_jax/configs/sheared/)")
    p.add_argument("--model", default=None,
                   help="the parent's shapes: a model preset (plrd_jax/configs/models/: smollm2-135m, llama2-7b, "
                        "mistral-7b) or an HF directory's config.json (default: the preset's parent)")
    p.add_argument("--topology", default="v5e-8", help="v5e-8, v5p-8, v5p-16, v4-8 or 8xh100")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor over the slice's chips (-1: the rest)")
    p.add_argument("--members", default=None, help="member indices to plan, e.g. 0,2 (default all)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (default the preset's)")
    p.add_argument("--grad-accum", type=positive_int, default=None)
    p.add_argument("--eval-batch", type=positive_int, default=None,
                   help="sequences per evaluation step (default: a training micro-batch)")
    p.add_argument("--steps", default=None, help="which steps to plan, e.g. heal,eval (default: every step the "
                                                 "preset runs: heal,eval; Sheared: prune,heal,eval)")
    p.add_argument("--remat", choices=["none", "full", "dots"], default=None)
    p.add_argument("--layers", choices=["scanned", "unrolled"], default="scanned",
                   help="scanned (params stacked, as `family` runs them) or unrolled layers")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="compute dtype")
    p.set_defaults(func=run)


PARENTS = {"mistral-7b-3.1b": "mistral-7b", "llama2-7b-3.3b": "llama2-7b", "llama2-7b-2.7b": "llama2-7b",
           "llama2-7b-1.3b": "llama2-7b"}


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
    """Each stage's member shapes, as the family would make them (ranks from shapes alone; layers scanned
    when the parent's are and the member's all share one shape)."""
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.config import LinearSpec
    from plrd_jax.nn.layout import stores_stacked
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.transforms.plan import resolve_ranks

    parent_count, source, out = count_params(abstract_params(parent)), parent, []
    for stage in schedule.stages:
        shapes = abstract_params(source.replace(scan_layers=False))  # ranks are planned per layer
        ranks = resolve_ranks(shapes, stage.plan(parent_count, schedule.matrices, schedule.multiple_of))
        member = source.with_linears({p: LinearSpec("lowrank", rank=r) for p, r in ranks.items()})
        member = member.replace(scan_layers=parent.scan_layers)
        member = member.replace(scan_layers=stores_stacked(member))
        out.append(member)
        source = member if schedule.progressive else parent
    return out


def run(args) -> None:
    import jax

    from plrd_jax.methods.plrd import PRESETS
    from plrd_jax.methods.sheared import PRESETS as SHEARED
    from plrd_jax.training.aot import accelerator, check_mesh

    slice_ = accelerator(args.topology)
    if args.preset not in PRESETS and args.preset not in SHEARED:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join([*PRESETS, *SHEARED])}")
    sheared = args.preset in SHEARED
    schedule = SHEARED[args.preset] if sheared else PRESETS[args.preset]
    steps = (args.steps or ("prune,heal,eval" if sheared else "heal,eval")).split(",")
    unknown = [s for s in steps if s not in (("prune", "heal", "eval") if sheared else ("heal", "eval"))]
    if unknown:
        raise ValueError(f"--steps: {', '.join(unknown)} is not a step of {args.preset!r} "
                         f"({'prune, heal, eval' if sheared else 'heal, eval'})")
    mesh = tuple(int(x) for x in args.mesh.split(","))
    parent = parent_config(args, args.preset).replace(dtype=args.dtype, remat=args.remat or "none",
                                                      scan_layers=args.layers == "scanned")
    batch = args.batch_size or schedule.batch_size
    accum = args.grad_accum or schedule.heal.grad_accum
    if batch % accum:
        raise ValueError(f"--batch-size {batch} is not a multiple of --grad-accum {accum}")
    check_mesh(parent, mesh, slice_.chips, batch // accum)  # one-line errors before any compile
    if args.eval_batch:
        check_mesh(parent, mesh, slice_.chips, args.eval_batch)
    chosen_members(args, len(schedule.members if sheared else schedule.stages))
    if jax.device_count() < slice_.chips:  # re-run with as many host CPU devices as the slice has chips
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                          f"--xla_force_host_platform_device_count={slice_.chips}".strip(),
               "JAX_PLATFORMS": "cpu"}
        os.execve(sys.executable, [sys.executable, "-m", "plrd_jax", *sys.argv[1:]], env)
    _plan_members(args, schedule, sheared, steps, parent, batch, accum, slice_, mesh)


def _planned_steps(args, schedule, sheared, steps, parent, batch, accum):
    """(member index, name, step, config, plan function) for every step to plan, in run order."""
    heal = schedule.heal.replace(dtype=args.dtype, grad_accum=accum)
    eval_batch = args.eval_batch or batch // accum
    if sheared:
        members = [(m.name, m.target.resolve(parent).config(parent), m) for m in schedule.members]
    else:
        members = [(stage.name, config, None) for stage, config in zip(schedule.stages, member_configs(parent, schedule))]
    teacher = parent if not sheared and heal.kd_weight > 0 else None
    prune = schedule.prune.replace(dtype=args.dtype, grad_accum=accum) if sheared else None
    heal_batch = (schedule.continue_batch_size or batch) if sheared and not args.batch_size else batch
    for k in chosen_members(args, len(members)):
        name, config, member = members[k]
        for step in steps:  # each plan function then takes (slice, mesh shape)
            if step == "prune":
                yield k, name, step, parent, partial(_plan_prune, parent, member, prune, schedule, batch)
            elif step == "heal":
                yield k, name, step, config, partial(_plan_heal, config, heal, heal_batch, schedule.seq_len,
                                                     teacher=teacher)
            else:
                yield k, name, step, config, partial(_plan_eval, config, eval_batch, schedule.seq_len)


def chosen_members(args, count: int) -> list[int]:
    """The member indices of --members (default all), checked against the preset's `count` members."""
    if args.members is None:
        return list(range(count))
    try:
        chosen = [int(x) for x in args.members.split(",")]
    except ValueError:
        raise ValueError(f"--members {args.members!r}: expected indices such as 0,2") from None
    if any(not 0 <= k < count for k in chosen):
        raise ValueError(f"--members {args.members!r}: the preset has members 0..{count - 1}")
    return chosen


def _plan_heal(config, heal, batch, seq_len, slice_, mesh, teacher=None):
    from plrd_jax.training.aot import plan_heal_step

    out = plan_heal_step(config, heal, batch, seq_len, slice_, mesh, teacher)
    return out["heal"], out["step_s_at_peak"], out["suggestion"]


def _plan_prune(parent, member, prune, schedule, batch, slice_, mesh_shape):
    """Sheared's pruning step (masked parent, L0 masks and Lagrangian) from shapes alone."""
    import jax
    import jax.numpy as jnp

    from plrd_jax.methods.l0_pruning import make_prune_step, prune_state_layout
    from plrd_jax.nn.accounting import model_flops_per_token
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.nn.sharding import param_shardings
    from plrd_jax.training.aot import compile_report, slice_mesh, step_seconds_at_peak, suggest

    mesh = slice_mesh(parent, mesh_shape, slice_, batch // prune.grad_accum)
    shardings = param_shardings(abstract_params(parent), mesh)
    layout = prune_state_layout(parent, prune, schedule.l0, mesh, shardings)
    step = make_prune_step(parent, member.target, prune, schedule.l0, mesh, shardings, total_steps=1)
    tokens = jax.ShapeDtypeStruct((prune.grad_accum, batch // prune.grad_accum, schedule.seq_len), jnp.int32)
    report = compile_report(step, (layout, tokens, None), slice_, parent)
    flops = model_flops_per_token(parent, schedule.seq_len, training=True) * batch * schedule.seq_len
    max_accum = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
    return report, step_seconds_at_peak(flops, slice_), suggest(report, slice_, prune, parent, max_accum)


def _plan_eval(config, batch, seq_len, slice_, mesh_shape):
    """The evaluation step (`window_nll_sums`: a forward and the next-token NLL per window) from shapes alone."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from plrd_jax.evaluation.perplexity import decoder_apply_fn, window_nll_sums
    from plrd_jax.nn.accounting import model_flops_per_token
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.nn.sharding import batch_sharding, param_shardings
    from plrd_jax.training.aot import compile_report, slice_mesh, step_seconds_at_peak

    mesh = slice_mesh(config, mesh_shape, slice_, batch)
    params = abstract_params(config, param_shardings(abstract_params(config), mesh))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding(mesh))
    weights = jax.ShapeDtypeStruct((batch,), jnp.float32,
                                   sharding=NamedSharding(mesh, PartitionSpec(batch_sharding(mesh).spec[0])))
    report = compile_report(window_nll_sums, (decoder_apply_fn(config), params, tokens, weights), slice_, config)
    flops = model_flops_per_token(config, seq_len, training=False) * batch * seq_len
    return report, step_seconds_at_peak(flops, slice_), "fits" if report["fits"] else "a smaller --eval-batch"


def _plan_members(args, schedule, sheared, steps, parent, batch, accum, slice_, mesh) -> None:
    from plrd_jax.nn.accounting import count_params
    from plrd_jax.nn.model import abstract_params
    from plrd_jax.reporting.tables import markdown_table

    gib, rows = 1024 ** 3, []
    print(f"{args.preset} on {slice_.name} ({slice_.chips} chips, {slice_.hbm_bytes / gib:.1f} GiB each; "
          f"{slice_.source}); mesh {mesh}, batch {batch} × {schedule.seq_len}, grad_accum {accum}, "
          f"{args.dtype}; compiled for {slice_.chips} host CPU devices", flush=True)
    for k, name, step, config, plan in _planned_steps(args, schedule, sheared, steps, parent, batch, accum):
        report, seconds, suggestion = plan(slice_, mesh)
        rows.append([str(k), name, step, f"{count_params(abstract_params(config)) / 1e9:.2f}B",
                     f"{report['argument'] / gib:.2f}", f"{report['temp'] / gib:.2f}", f"{report['peak'] / gib:.2f}",
                     "yes" if report["fits"] else "no", f"{report['flops'] / 1e12:.3g}", f"{seconds:.3g}", suggestion])
        print(" | ".join(rows[-1]), flush=True)
    columns = ["member", "name", "step", "params", "args GiB/device", "temp GiB/device", "peak GiB/device", "fits",
               "XLA TFLOP/device (a loop body once: one micro-batch, one layer)", "step s at peak (model FLOPs)",
               "to fit"]
    print(markdown_table(rows, columns))
