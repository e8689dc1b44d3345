"""The two layouts of a decoder's params, as functions of the param tree and its config (no model code).

Per layer: one subtree `layers_{i}/...` per layer (see `nn.model`'s paths). Stacked (a scanned decoder whose
layers all share one shape, `ModelConfig.scan_layers`; MaxText's layout): one subtree `layers/...` whose leaves
carry a leading layer axis L, e.g. layers/attn/q/kernel (L, d, H·hd). The decoder runs either; the transforms
address matrices per layer and take either (`unstack_layers` at their entry).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from plrd_jax.nn.config import ModelConfig

STACK = "layers"  # the key of the stacked layout


def layer_runs(config: ModelConfig) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of consecutive layers whose linears have identical specs (what one scan can
    run: the same parameter shapes and kinds in every step)."""
    kinds = ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
    specs = [tuple(config.linear(f"layers_{i}/{k}") for k in kinds) for i in range(config.num_layers)]
    runs = []
    for i, spec in enumerate(specs):
        if runs and specs[runs[-1][0]] == spec:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def stack_layers(params, config: ModelConfig):
    """Per-layer params {layers_0: P_0, ..., layers_{L-1}: P_{L-1}, ...} -> {layers: P, ...} with every leaf of P
    the stack of the layers' leaves along a new leading axis (L, ...). Needs every layer to have the same specs
    (`layer_runs(config) == [(0, L)]`: uniform ranks, e.g. rounded with `RankPlan.multiple_of`); already
    stacked params are returned as they are. Pure: jit it with out_shardings to keep params sharded."""
    if STACK in params:
        return params
    runs = layer_runs(config)
    if len(runs) != 1:
        raise ValueError(f"layers {runs[1][0] - 1} and {runs[1][0]} differ in their linears' specs "
                         f"({len(runs)} runs of identical layers): only a decoder whose layers all share one "
                         "shape can be stored stacked; keep the per-layer layout")
    names = [f"layers_{i}" for i in range(config.num_layers)]
    out = {key: node for key, node in params.items() if key not in names}
    out[STACK] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    return out


def unstack_layers(params):
    """The inverse of `stack_layers`: {layers: P, ...} -> {layers_i: P[i], ...}; per-layer params as they are."""
    if STACK not in params:
        return params
    stacked = params[STACK]
    count = jax.tree.leaves(stacked)[0].shape[0]
    out = {key: node for key, node in params.items() if key != STACK}
    out.update({f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count)})
    return out


def arrange_layers(config: ModelConfig, params, scan: bool = True):
    """(config, params) laid out to run: with `scan` and every layer of one shape, scanned (`scan_layers`)
    and stored stacked; otherwise unrolled, one subtree per layer. Either way the same function of the tokens."""
    config = config.replace(scan_layers=bool(scan))
    config = config.replace(scan_layers=stores_stacked(config))
    return config, (stack_layers(params, config) if config.scan_layers else unstack_layers(params))


def stores_stacked(config: ModelConfig) -> bool:
    """Whether `config`'s params are in the stacked layout: scanned layers that all share one shape."""
    return config.scan_layers and config.num_layers > 1 and len(layer_runs(config)) == 1
