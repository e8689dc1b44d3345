"""Activation statistics of every matrix over calibration text, for the decompositions.

For each linear `y = x K`, `K (d_in, d_out)`, at path p, over the N calibration tokens whose inputs are
`x_t (d_in,)` (the input as the layer sees it):

  xtx          Σ_t x_t x_tᵀ                      (d_in, d_in)   the input second moment XᵀX (SVD-LLM)
  abs_sum      Σ_t |x_t|                          (d_in,)        mean |x| = abs_sum / N (ASVD)
  fisher_rows  Σ_w Σ_j (∂L_w / ∂K_ij)²            (d_in,)        row sums of the empirical Fisher diagonal,
                                                                 one gradient per window w (FWSVD); zeros
                                                                 unless `fisher=True`
  tokens       N

All accumulate in float32. One jitted step per batch runs the model with a Flax method interceptor that
records every `Linear`'s input, so the model code is untouched and any parameterization (dense, lowrank, …)
can be calibrated. ∂L_w/∂K is taken through the layer's output, `Xᵀ ∂L_w/∂Y`, so it is the gradient with
respect to the effective matrix even when K is stored as factors. Statistics are laid out like the params:
dimension d_in is sharded as the kernel's d_in is (`plrd_jax.nn.sharding`).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.linears import Linear
from plrd_jax.nn.layout import unstack_layers
from plrd_jax.nn.model import Decoder
from plrd_jax.nn.sharding import (RULES, batch_sharding, fsdp_fallback, logical_axes, make_mesh, param_shardings,
                                  partition_spec)
from plrd_jax.training.losses import next_token_loss


class MatrixStats(NamedTuple):
    """Calibration statistics of one matrix (module docstring); a pytree of float32 arrays."""

    xtx: jax.Array  # (d_in, d_in)
    abs_sum: jax.Array  # (d_in,)
    fisher_rows: jax.Array  # (d_in,)
    tokens: jax.Array  # () number of tokens N

    @property
    def second_moment(self) -> jax.Array:
        """XᵀX / N."""
        return self.xtx / self.tokens

    @property
    def mean_abs(self) -> jax.Array:
        """mean_t |x_t| (d_in,)."""
        return self.abs_sum / self.tokens


def _zeros(d_in: int) -> MatrixStats:
    return MatrixStats(jnp.zeros((d_in, d_in), jnp.float32), jnp.zeros((d_in,), jnp.float32),
                       jnp.zeros((d_in,), jnp.float32), jnp.zeros((), jnp.float32))


def _record_linears(records: dict, probes: Mapping | None = None):
    """Interceptor: records[path] = input of every Linear; adds probes[path] (zeros), where given, to its output,
    so that the gradient with respect to a probe is ∂L/∂Y of that layer."""
    def interceptor(next_fun, args, kwargs, context):
        if not isinstance(context.module, Linear) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        records[path] = args[0]
        y = next_fun(*args, **kwargs)
        return y if probes is None or path not in probes else y + probes[path].astype(y.dtype)
    return nn.intercept_methods(interceptor)


def linear_paths(config: ModelConfig, params) -> dict[str, tuple[int, int]]:
    """path -> (d_in, d_out) of every Linear the model runs (every matrix, and the LM head when untied)."""
    records: dict = {}

    def run(p):
        with _record_linears(records):
            Decoder(config.replace(scan_layers=False)).apply({"params": p}, jnp.zeros((1, 2), jnp.int32))

    jax.eval_shape(run, params)
    return {path: (x.shape[-1], config.matrix_shape(path)[1]) for path, x in records.items()}


def _input_moments(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, T, d_in), weights (B,) -> the weighted tokens' XᵀX, Σ|x| and count."""
    x = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
    wx = x * weights[:, None, None]
    return (jnp.einsum("btd,bte->de", wx, x, precision="highest"), jnp.abs(wx).sum((0, 1)),
            weights.sum() * x.shape[1])


def _add_inputs(stats: dict, records: dict, weights: jax.Array) -> dict:
    """stats + the moments of each recorded input, computed once per distinct input (q, k, v share theirs)."""
    moments, new = {}, {}
    for path, s in stats.items():
        x = records[path]
        if id(x) not in moments:
            moments[id(x)] = _input_moments(x, weights)
        xtx, abs_sum, tokens = moments[id(x)]
        new[path] = s._replace(xtx=s.xtx + xtx, abs_sum=s.abs_sum + abs_sum, tokens=s.tokens + tokens)
    return new


def _make_step(config: ModelConfig, shapes: dict[str, tuple[int, int]], fisher: bool):
    model = Decoder(config.replace(scan_layers=False))  # the interceptor records each layer by its path

    def forward_step(stats, params, tokens, weights):
        records: dict = {}
        with _record_linears(records):
            model.apply({"params": params}, tokens)
        return _add_inputs(stats, records, weights)

    def fisher_step(stats, params, tokens, weights):
        def window(stats, inputs):
            tokens_w, weight = inputs
            probes = {p: jnp.zeros((1, tokens_w.shape[0], d_out), jnp.float32) for p, (_, d_out) in shapes.items()}

            def loss_fn(probes):
                records: dict = {}
                with _record_linears(records, probes):
                    logits = model.apply({"params": params}, tokens_w[None])
                return next_token_loss(logits, tokens_w[None]), records

            (_, records), grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
            new = _add_inputs(stats, records, weight[None])
            for p, s in new.items():
                x = records[p].astype(jnp.float32)[0]
                grad_k = jnp.matmul(x.T, grads[p][0], precision="highest")  # ∂L_w/∂K (d_in, d_out)
                new[p] = s._replace(fisher_rows=s.fisher_rows + weight * jnp.sum(grad_k * grad_k, axis=1))
            return new, None

        stats, _ = jax.lax.scan(window, stats, (tokens, weights))
        return stats

    return fisher_step if fisher else forward_step


def stats_shardings(shapes: Mapping[str, tuple[int, int]], mesh: Mesh, rules: Mapping = RULES):
    """NamedShardings of the stats: dimension d_in split as the kernel's d_in is, the rest replicated; a Gram
    matrix whose rows no rule splits over fsdp (o and down under pure fsdp: their d_in is a tensor axis) gets
    its rows split over fsdp (`fsdp_fallback`), so that no device holds a whole d_in × d_in Gram."""
    out = {}
    for path, (d_in, d_out) in shapes.items():
        axis = logical_axes(f"{path}/kernel", (d_in, d_out))[0]
        row = partition_spec((axis,), (d_in,), mesh.shape, rules)
        gram = fsdp_fallback(PartitionSpec(row[0], None), (d_in, d_in), mesh.shape)
        out[path] = MatrixStats(NamedSharding(mesh, gram), NamedSharding(mesh, row),
                                NamedSharding(mesh, row), NamedSharding(mesh, PartitionSpec()))
    return out


@functools.lru_cache(maxsize=8)
def _jitted_step(config: ModelConfig, shapes: tuple, fisher: bool, mesh: Mesh):
    shapes = dict(shapes)
    shardings = stats_shardings(shapes, mesh)
    tokens = batch_sharding(mesh) if not fisher else NamedSharding(mesh, PartitionSpec())
    return jax.jit(_make_step(config, shapes, fisher), in_shardings=(shardings, None, tokens, None),
                   out_shardings=shardings, donate_argnums=0)


def calibrate(config: ModelConfig, params, windows: np.ndarray, batch_size: int = 4, *, fisher: bool = False,
              mesh: Mesh | None = None, progress: Callable[[int, int], None] | None = None,
              paths: Iterable[str] | None = None) -> dict[str, MatrixStats]:
    """Statistics (`MatrixStats`) of every Linear of `Decoder(config)` with `params` over `windows` [N, T].

    Batches of `batch_size` windows (the last one padded with weight 0), one jitted step each; with
    `fisher=True` each window also gets its own backward pass (next-token cross-entropy of that window).
    mesh: default all devices on the fsdp axis; params are placed by `param_shardings`. progress(done, total)
    is called after each batch (windows done, windows in all).
    paths: only these Linears' statistics (default all, see `linear_paths`). Without Fisher rows the step then
    depends on the forward only up to those layers, and XLA drops the rest of it (later layers, the LM head):
    calibrating layer i alone costs the forward of layers 0..i.
    """
    params = unstack_layers(params)  # statistics are kept per layer, by path
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or len(windows) == 0:
        raise ValueError(f"calibration windows must be [N, T] with N >= 1, T >= 2, got shape {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    if windows.shape[1] > config.max_seq_len:
        raise ValueError(f"window length {windows.shape[1]} exceeds the model's max_seq_len {config.max_seq_len}")
    mesh = make_mesh() if mesh is None else mesh
    shapes = linear_paths(config, params)
    if paths is not None:
        paths = list(dict.fromkeys(paths))
        unknown = [p for p in paths if p not in shapes]
        if unknown or not paths:
            raise ValueError(f"no Linear at {', '.join(map(repr, unknown)) or 'an empty path list'}; "
                             f"the model's Linears are e.g. {', '.join(list(shapes)[:3])}")
        shapes = {p: shapes[p] for p in shapes if p in paths}
    n = len(windows)
    batch_size = min(batch_size, n)
    if not fisher:  # the batch splits over the mesh's batch axes
        split = math.prod(mesh.shape[a] for a in RULES["batch"])
        batch_size = -(-batch_size // split) * split
    step = _jitted_step(config, tuple(sorted(shapes.items())), fisher, mesh)
    params = jax.device_put(params, param_shardings(params, mesh))
    stats = jax.device_put({p: _zeros(d_in) for p, (d_in, _) in shapes.items()}, stats_shardings(shapes, mesh))
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size]
        weights = np.zeros(batch_size, np.float32)
        weights[:len(batch)] = 1.0
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), batch.shape[1]), batch.dtype)])
        stats = step(stats, params, jnp.asarray(batch, jnp.int32), jnp.asarray(weights))
        if progress is not None:
            jax.block_until_ready(stats)
            progress(min(start + batch_size, n), n)
    return stats
