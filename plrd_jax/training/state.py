"""TrainState (step, float32 master params, optimizer state) and its shardings.

Only floating-point leaves train (`trainable`); integer leaves (SLTrain's fixed support `indices`) are carried
unchanged (`frozen`), and `merge` puts the two halves back together.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from plrd_jax.nn.sharding import RULES, param_shardings, replicated
from plrd_jax.training.optim import HealConfig, make_optimizer


def _is_trainable(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def trainable(params):
    """`params` with every non-floating leaf replaced by None (those do not train)."""
    return jax.tree.map(lambda x: x if _is_trainable(x) else None, params)


def frozen(params):
    """`params` with every floating leaf replaced by None: the leaves a step carries unchanged."""
    return jax.tree.map(lambda x: None if _is_trainable(x) else x, params)


def merge(first, second):
    """Leaf of `first`, or of `second` where `first` holds None."""
    return jax.tree.map(lambda a, b: b if a is None else a, first, second, is_leaf=lambda x: x is None)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any  # the "params" collection, float32 master weights
    opt_state: Any  # optimizer state over `trainable(params)`


def new_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0, `params`, and `optimizer`'s initial state over `trainable(params)`."""
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trainable(params)))


def train_state_shardings(abstract_state: TrainState, params_shardings, mesh: Mesh):
    """Shardings for a whole TrainState: any leaf whose trailing dict keys name a param of the same shape
    (params, Adam's mu and nu) gets that param's sharding; everything else is replicated."""
    shapes = {}
    for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_state.params),
                          jax.tree.leaves(params_shardings)):
        shapes[tuple(str(k.key) for k in kp)] = (x.shape, s)

    def pick(key_path, x):
        names = []
        for k in reversed(key_path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            names.insert(0, str(k.key))
        for i in range(len(names)):
            shape, s = shapes.get(tuple(names[i:]), (None, None))
            if shape == x.shape:
                return s
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def abstract_like(tree):
    """ShapeDtypeStructs (with each leaf's sharding) of a tree of arrays: a restore target or a lowering input."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def init_train_state(params, optimizer: HealConfig | optax.GradientTransformation, mesh: Mesh,
                     params_shardings=None, rules=RULES) -> TrainState:
    """A fresh TrainState (step 0, zero optimizer moments) with params and moments on their shardings.

    optimizer: an optax transformation, or a HealConfig (`make_optimizer(heal_config)`). Floating params are
    cast to float32 (the master weights). params_shardings default `param_shardings(params, mesh, rules)`.
    """
    if isinstance(optimizer, HealConfig):
        optimizer = make_optimizer(optimizer)
    params = jax.tree.map(lambda x: x.astype(jnp.float32) if _is_trainable(x) and x.dtype != jnp.float32 else x,
                          params)
    if params_shardings is None:
        params_shardings = param_shardings(params, mesh, rules)
    abstract = jax.eval_shape(lambda p: new_state(p, optimizer), params)
    shardings = train_state_shardings(abstract, params_shardings, mesh)
    params = jax.device_put(params, params_shardings)
    return jax.jit(lambda p: new_state(p, optimizer), out_shardings=shardings)(params)
