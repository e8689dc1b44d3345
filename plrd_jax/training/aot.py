"""Plans before renting: a training step compiled ahead of time for a slice, from abstract parameters.

`plan_heal_step(config, heal, batch, seq_len, accelerator, ...)` lowers and compiles the healing step (with its
teacher's forward, when it distils) from ShapeDtypeStructs only — no weights, no accelerator — over a mesh of
the slice's chip count (`compile_report` does the same for any jitted step: the `plan` command also plans
Sheared's pruning step and the evaluation step), then reads XLA's per-device memory analysis (arguments, outputs, temporaries) and cost analysis (FLOPs
of one device's program, loop bodies counted once). The step time implied at the chips' peak is the step's model
FLOPs / (chips · peak) (a lower bound; `nn.accounting.model_flops_per_token`), and MFU at a measured step time t
is model FLOPs / (t · chips · peak).

Without the target's compiler (a TPU's needs libtpu and the chips), the program is compiled for as many CPU
devices as the slice has chips, with the same mesh and shardings: the partitioning, each device's arguments
and outputs are the target's; temporaries follow XLA:CPU's buffer assignment and fusion, which differ from a
TPU's, so read them as an estimate. Run it in a process whose JAX sees that many devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`; the `plan` command re-executes itself that way).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from plrd_jax.nn.accounting import model_flops_per_token
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import abstract_params
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.training.compile import compiler_options, memory_stats
from plrd_jax.training.loop import state_layout
from plrd_jax.training.optim import HealConfig, make_optimizer
from plrd_jax.training.step import make_heal_step

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A slice: chips, memory per chip (bytes) and dense bf16 peak per chip (FLOP/s), with the page read."""

    name: str
    chips: int
    hbm_bytes: int
    peak_flops: float
    source: str


ACCELERATORS = {a.name: a for a in (
    Accelerator("v5e-8", 8, 16 * 10 ** 9, 197e12, "https://cloud.google.com/tpu/docs/v5e (16 GB, 197 TFLOPs bf16)"),
    Accelerator("v5p-8", 4, 95 * 10 ** 9, 459e12, "https://cloud.google.com/tpu/docs/v5p (2x2x1: 4 chips; 95 GB, 459 TFLOPs)"),
    Accelerator("v5p-16", 8, 95 * 10 ** 9, 459e12, "https://cloud.google.com/tpu/docs/v5p (2x2x2: 8 chips; 95 GB, 459 TFLOPs)"),
    Accelerator("v4-8", 4, 32 * GIB, 275e12, "https://cloud.google.com/tpu/docs/v4 (4 chips; 32 GiB, 275 TFLOPs)"),
    Accelerator("8xh100", 8, 80 * 10 ** 9, 989e12, "H100 SXM datasheet (80 GB, 989 TFLOPs dense bf16)"),
)}


class PlanError(ValueError):
    """A topology, mesh or model that cannot be planned as asked."""


def accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise PlanError(f"unknown topology {name!r}; expected one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]


def check_mesh(config: ModelConfig, mesh_shape, chips: int, batch: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) mesh over `chips` (-1: the rest), checked against the model's shapes and the
    batch before anything compiles."""
    shape = list(mesh_shape)
    if shape.count(-1) > 1:
        raise PlanError(f"mesh {mesh_shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or chips % known:
        raise PlanError(f"mesh {mesh_shape} does not divide the slice's {chips} chips")
    shape = [chips // known if s == -1 else s for s in shape]
    if math.prod(shape) != chips:
        raise PlanError(f"mesh {tuple(shape)} uses {math.prod(shape)} devices, the slice has {chips}")
    data, fsdp, tensor = shape
    if batch % (data * fsdp):
        raise PlanError(f"a micro-batch of {batch} sequences does not divide over data × fsdp = {data * fsdp} "
                        "devices (fewer --grad-accum or a bigger --batch-size)")
    for name, size in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                       ("num_kv_heads", config.num_kv_heads)):
        if size % tensor:
            raise PlanError(f"{name} {size} does not divide over tensor = {tensor} devices")
    return data, fsdp, tensor


def slice_mesh(config: ModelConfig, mesh_shape, slice_: Accelerator, micro_batch: int) -> Mesh:
    """The checked (`check_mesh`) mesh over the first `slice_.chips` devices of this process."""
    mesh_shape = check_mesh(config, mesh_shape, slice_.chips, micro_batch)
    if jax.device_count() < slice_.chips:
        raise PlanError(f"{slice_.name} needs {slice_.chips} devices; this process sees {jax.device_count()} "
                        f"(set XLA_FLAGS=--xla_force_host_platform_device_count={slice_.chips})")
    return make_mesh(mesh_shape, jax.devices()[:slice_.chips])


def compile_report(jitted, args, slice_: Accelerator, config: ModelConfig) -> dict:
    """Lower `jitted` on abstract `args` (ShapeDtypeStructs with shardings), compile it, and read its per-device
    memory_stats, "flops" (XLA's count of one device's program: a loop body counts once) and "fits"."""
    return _report(jitted.lower(*args).compile(compiler_options=compiler_options(config)), slice_)


def plan_heal_step(config: ModelConfig, heal: HealConfig, batch: int, seq_len: int, slice_: Accelerator,
                   mesh_shape=(1, -1, 1), teacher: ModelConfig | None = None) -> dict:
    """Compile the heal step for `slice_` (see the module docstring); returns {"mesh", "heal": {memory_stats,
    "flops", "fits"} (`compile_report`), "model_flops" (the whole step's: 6N + attention per token, plus a
    teacher's 2N + attention), "step_s_at_peak" (model_flops / (chips · peak)), "suggestion"}."""
    mesh = slice_mesh(config, mesh_shape, slice_, batch // heal.grad_accum)
    shardings = param_shardings(abstract_params(config), mesh)
    layout = state_layout(abstract_params(config), make_optimizer(heal), mesh, shardings)
    teacher_abstract = None
    if teacher is not None:
        teacher_abstract = abstract_params(teacher, param_shardings(abstract_params(teacher), mesh))
    step = make_heal_step(config, heal, mesh, shardings, teacher=teacher)
    tokens = jax.ShapeDtypeStruct((heal.grad_accum, batch // heal.grad_accum, seq_len), jnp.int32)
    out = {"mesh": list(mesh.devices.shape), "heal": compile_report(step, (layout, tokens, teacher_abstract),
                                                                     slice_, config)}
    out["model_flops"] = model_flops_per_token(config, seq_len, training=True) * batch * seq_len
    if teacher is not None:  # the teacher's forward, 2N + attention per token
        out["model_flops"] += model_flops_per_token(teacher, seq_len, training=False) * batch * seq_len
    out["step_s_at_peak"] = step_seconds_at_peak(out["model_flops"], slice_)
    out["suggestion"] = suggest(out["heal"], slice_, heal, config, batch // (mesh.shape["data"] * mesh.shape["fsdp"]))
    return out


def step_seconds_at_peak(model_flops: float, slice_: Accelerator) -> float:
    """The step time a step of `model_flops` would take at every chip's peak: a lower bound."""
    return model_flops / (slice_.chips * slice_.peak_flops)


def _report(compiled, slice_: Accelerator) -> dict:
    stats = memory_stats(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    return {**stats, "flops": flops, "fits": stats["peak"] <= slice_.hbm_bytes}


def suggest(report: dict, slice_: Accelerator, heal: HealConfig, config: ModelConfig, max_accum: int) -> str:
    """The flag that would make a step fit, from where its memory goes (no recompilation). max_accum: the most
    micro-batches a step can be cut into (one sequence per batch device each)."""
    if report["fits"]:
        return "fits"
    resident = report["argument"]  # params, optimizer state and batch: what stays between steps
    if resident >= slice_.hbm_bytes:
        return "more fsdp: the state alone exceeds one chip's memory, use a bigger slice"
    room = slice_.hbm_bytes - resident
    if config.remat == "none":
        return "--remat full (recompute each block in the backward pass), then re-plan"
    accum = heal.grad_accum * math.ceil(report["temp"] / room)
    while accum <= max_accum and max_accum % accum:
        accum += 1
    if accum > max_accum:
        return "a bigger slice (more fsdp) or a shorter --seq-len: one sequence per device already needs more"
    return f"--grad-accum {accum} (smaller micro-batches)"
