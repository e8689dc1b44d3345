"""Ahead-of-time compilation of a step: XLA options that keep remat effective, and the compiled program's
memory analysis (what a device holds while the step runs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import abstract_params
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.training.optim import HealConfig, make_optimizer
from plrd_jax.training.loop import state_layout
from plrd_jax.training.step import make_heal_step


def compiler_options(config: ModelConfig) -> dict | None:
    """XLA options that keep `config.remat` effective. XLA:CPU turns the optimization barriers of
    `jax.checkpoint` into plain values (its cse_barrier_expander pass) and then CSE merges the recomputation back
    into the forward pass, which silently undoes remat; on CPU that pass is switched off when remat is on."""
    if config.remat != "none" and jax.default_backend() == "cpu":
        return {"xla_disable_hlo_passes": "cse_barrier_expander"}
    return None


def memory_stats(compiled) -> dict[str, int]:
    """Bytes from XLA's memory analysis of a compiled function: arguments, outputs, aliased (donated), temporaries,
    and peak = arguments + outputs + temporaries − aliased (what the device holds while it runs)."""
    m = compiled.memory_analysis()
    stats = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    stats["peak"] = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
    return stats


def compile_train_step(config: ModelConfig, heal: HealConfig, micro_batch: int, seq_len: int,
                       mesh=None, shardings=None, state=None):
    """(compiled step, memory_stats) of `make_heal_step` for tokens (grad_accum, micro_batch, seq_len); the
    state is abstract unless given."""
    mesh = make_mesh() if mesh is None else mesh
    if shardings is None:
        shardings = param_shardings(abstract_params(config), mesh)
    step_fn = make_heal_step(config, heal, mesh, shardings)
    if state is None:
        state = state_layout(abstract_params(config), make_optimizer(heal), mesh, shardings)
    tokens = jax.ShapeDtypeStruct((heal.grad_accum, micro_batch, seq_len), jnp.int32)
    compiled = step_fn.lower(state, tokens, None).compile(compiler_options=compiler_options(config))
    return compiled, memory_stats(compiled)
