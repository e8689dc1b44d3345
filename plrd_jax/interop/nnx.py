"""Factorized params in a user's `flax.nnx` model: low-rank Linear modules and graph surgery to and from them.

`factorize` works on pure dicts (`nnx.to_pure_dict(nnx.state(model))`); its output holds `{"A", "B"}` where
the model's `nnx.Linear` / `nnx.LinearGeneral` hold a `kernel`, so `nnx.replace_by_pure_dict` cannot load it
(`('l1', 'A')` is not in the state). `lowrank_nnx` swaps each such layer for `LowRankLinear` /
`LowRankLinearGeneral` (same call semantics, config and bias) and then loads the whole tree; `dense_nnx` swaps
back. The new Variables are made from the old ones (`Variable.replace`), so `nnx.state(model)` keeps its leaf
types (e.g. a user's `nnx.Param` subclass) and metadata; only the axis names in `out_sharding` follow the
factors' layout (kernel S + I + O -> A S + I + (r,), B S + (r,) + O, the rank axis unsharded):

    kernel out_sharding ('embed', 'mlp')  ->  A ('embed', None), B (None, 'mlp')  ->  kernel ('embed', 'mlp')
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.frozen_dict import FrozenDict
from flax.nnx.nn import dtypes
from jax import lax

from plrd_jax.interop.linen import apply_factors, default_init, factor_product, flat_init

__all__ = ["LowRankLinear", "LowRankLinearGeneral", "lowrank_nnx", "dense_nnx"]

_NO_METADATA = MappingProxyType({})
SHARDING_KEY = "out_sharding"  # flax >= 0.12's name for a Variable's axis names (was sharding_names)


def _tuple(x) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _nnx_promote(module):
    return lambda x, w, bias: module.promote_dtype((x, w, bias), dtype=module.dtype)


def _dot_kwargs(module) -> dict:
    pet = module.preferred_element_type
    return {} if pet is None else {"preferred_element_type": pet}


class LowRankLinear(nnx.Module):
    """`nnx.Linear` with K = A B: nnx.Param A (in_features, rank), B (rank, out_features), bias (out_features,).

    y = (x A) B + bias for x (…, in_features). Default init: A, B lecun_normal (fan-in in_features, resp.
    rank), so entries of A B have Linear's variance 1/in_features.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, precision=None, a_init=default_init, b_init=default_init,
                 bias_init=nnx.initializers.zeros_init(), dot_general=lax.dot_general,
                 promote_dtype=dtypes.promote_dtype, preferred_element_type=None, rngs: nnx.Rngs,
                 a_metadata: Mapping[str, Any] = _NO_METADATA, b_metadata: Mapping[str, Any] = _NO_METADATA,
                 bias_metadata: Mapping[str, Any] = _NO_METADATA):
        self.A = nnx.Param(a_init(rngs.params(), (in_features, rank), param_dtype), **a_metadata)
        self.B = nnx.Param(b_init(rngs.params(), (rank, out_features), param_dtype), **b_metadata)
        self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)
                     if use_bias else nnx.data(None))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
        self.dot_general, self.promote_dtype = dot_general, promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """inputs (…, in_features) -> (…, out_features); out_sharding as nnx.Linear's (for the output)."""
        bias = self.bias[...] if self.bias is not None else None
        return apply_factors(inputs, self.A[...], self.B[...], bias, axis=-1, features=(self.out_features,),
                             promote=_nnx_promote(self), precision=self.precision, dot_general=self.dot_general,
                             out_kwargs={"out_sharding": out_sharding}, **_dot_kwargs(self))


class LowRankLinearGeneral(nnx.Module):
    """`nnx.LinearGeneral` with K = A B: with S = batch_axis sizes, I = in_features, O = out_features,
    nnx.Param A S + I + (rank,), B S + (rank,) + O, bias S + O. `axis`, `batch_axis` and the output layout
    (batch + rest + O) are LinearGeneral's; e.g. an output projection in_features=(heads, head_dim),
    out_features=d, axis=(-2, -1): A (heads, head_dim, r), B (r, d).
    """

    def __init__(self, in_features, out_features, rank: int, *, axis=-1, batch_axis=FrozenDict({}),
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32, precision=None, a_init=default_init,
                 b_init=default_init, bias_init=nnx.initializers.zeros_init(), dot_general=None,
                 dot_general_cls=None, promote_dtype=dtypes.promote_dtype, preferred_element_type=None,
                 rngs: nnx.Rngs, a_metadata: Mapping[str, Any] = _NO_METADATA,
                 b_metadata: Mapping[str, Any] = _NO_METADATA, bias_metadata: Mapping[str, Any] = _NO_METADATA):
        self.in_features, self.out_features = _tuple(in_features), _tuple(out_features)
        self.axis, self.batch_axis, self.rank = _tuple(axis), FrozenDict(batch_axis), rank
        if len(self.in_features) != len(self.axis):
            raise ValueError(f"in_features {self.in_features} and axis {self.axis} must have the same length")
        s = tuple(self.batch_axis.values())
        a_shape, b_shape = s + self.in_features + (rank,), s + (rank,) + self.out_features
        self.A = nnx.Param(flat_init(a_init, len(a_shape) - 1)(rngs.params(), a_shape, param_dtype), **a_metadata)
        self.B = nnx.Param(flat_init(b_init, len(s) + 1)(rngs.params(), b_shape, param_dtype), **b_metadata)
        self.bias = (nnx.Param(flat_init(bias_init, None)(rngs.params(), s + self.out_features, param_dtype),
                               **bias_metadata) if use_bias else nnx.data(None))
        self.use_bias, self.dtype, self.param_dtype, self.precision = use_bias, dtype, param_dtype, precision
        self.dot_general, self.dot_general_cls, self.promote_dtype = dot_general, dot_general_cls, promote_dtype
        self.preferred_element_type = preferred_element_type

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """inputs: batch + … + in_features (at `axis`) -> batch + rest + out_features."""
        if self.dot_general_cls is not None:
            dot_general = self.dot_general_cls()
        else:
            dot_general = self.dot_general or lax.dot_general
        bias = self.bias[...] if self.bias is not None else None
        return apply_factors(inputs, self.A[...], self.B[...], bias, axis=self.axis,
                             batch_dims=tuple(self.batch_axis.keys()), features=self.out_features,
                             promote=_nnx_promote(self), precision=self.precision, dot_general=dot_general,
                             out_kwargs={"out_sharding": out_sharding}, **_dot_kwargs(self))


# ---- pure trees ----------------------------------------------------------------------------------
def _pure(tree):
    """A nested dict of arrays from a pure dict, an nnx.State, or a mix (Variable leaves are unwrapped)."""
    if isinstance(tree, nnx.Variable):
        return tree.get_value()
    if isinstance(tree, Mapping):
        return {k: _pure(v) for k, v in tree.items()}
    return jnp.asarray(tree) if isinstance(tree, np.ndarray) else tree


def _lookup(tree, path):
    """tree[path] (keys matched as given, as str, or as int for a digit string), None where absent."""
    node = tree
    for key in path:
        if not isinstance(node, Mapping):
            return None
        keys = (key, str(key)) + ((int(key),) if isinstance(key, str) and key.isdigit() else ())
        match = next((k for k in keys if k in node), None)
        if match is None:
            return None
        node = node[match]
    return node


def _load(model, tree) -> None:
    """Every value of `tree` into the model's own Variables (types and metadata kept)."""
    state = nnx.state(model)
    try:
        nnx.replace_by_pure_dict(state, tree)
    except ValueError as e:
        raise ValueError(f"the tree does not fit the model ({e}); factors A, B can only replace the kernel of an "
                         "nnx.Linear / nnx.LinearGeneral (lowrank_nnx), a kernel only that of the low-rank "
                         "modules (dense_nnx)") from e
    nnx.update(model, state)


# ---- sharding names ------------------------------------------------------------------------------
def _names(var: nnx.Variable, ndim: int):
    """The Variable's out_sharding axis names as a tuple (None if it has none), checked against its ndim."""
    names = var.get_metadata().get(SHARDING_KEY)
    if names is None or isinstance(names, jax.sharding.NamedSharding):
        return None
    names = tuple(names)
    if len(names) != ndim:
        raise ValueError(f"{SHARDING_KEY} {names} does not name the {ndim} axes of its {ndim}-D value")
    return names


def _as_spec(like, names: tuple):
    return {SHARDING_KEY: jax.sharding.PartitionSpec(*names)
            if isinstance(like, jax.sharding.PartitionSpec) else names}


def _split_names(kernel: nnx.Variable, n_s: int, n_in: int):
    """Metadata updates for A, B from the kernel's names S + I + O: A S + I + (None,), B S + (None,) + O."""
    names = _names(kernel, np.ndim(kernel.get_value()))
    if names is None:
        return {}, {}
    like = kernel.get_metadata()[SHARDING_KEY]
    return (_as_spec(like, names[:n_s + n_in] + (None,)),
            _as_spec(like, names[:n_s] + (None,) + names[n_s + n_in:]))


def _join_names(a: nnx.Variable, b: nnx.Variable, n_s: int):
    """Metadata update for K = A B: A's names without the rank axis, then B's output names."""
    a_ndim, b_ndim = np.ndim(a.get_value()), np.ndim(b.get_value())
    a_names, b_names = _names(a, a_ndim), _names(b, b_ndim)
    if a_names is None and b_names is None:
        return {}
    like = (a if a_names is not None else b).get_metadata()[SHARDING_KEY]
    a_names, b_names = a_names or (None,) * a_ndim, b_names or (None,) * b_ndim
    return _as_spec(like, a_names[:-1] + b_names[n_s + 1:])


# ---- graph surgery -------------------------------------------------------------------------------
_LINEAR_FIELDS = ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision", "dot_general",
                  "promote_dtype", "preferred_element_type")
_GENERAL_FIELDS = _LINEAR_FIELDS + ("axis", "batch_axis", "dot_general_cls")
_PAIRS = ((nnx.Linear, LowRankLinear, _LINEAR_FIELDS), (nnx.LinearGeneral, LowRankLinearGeneral, _GENERAL_FIELDS))


def _abstract(cls, module, fields, **extra):
    """A `cls` with `module`'s config and abstract (shape-only) Variables, to be given real ones: no init."""
    config = {f: getattr(module, f) for f in fields}
    return nnx.eval_shape(lambda: cls(**config, **extra, rngs=nnx.Rngs(0)))


def _relink(node, new: dict) -> None:
    """Every reference held by `node` (Module attribute, list item, dict value) to a replaced module -> its
    replacement, so a module shared by several parents is replaced everywhere."""
    if isinstance(node, nnx.Module):  # nnx.List / nnx.Dict keep their items as attributes too
        for name, child in list(vars(node).items()):
            if id(child) in new:
                setattr(node, name, new[id(child)])
    elif isinstance(node, (MutableSequence, MutableMapping)):
        for key, child in list(node.items() if isinstance(node, MutableMapping) else enumerate(node)):
            if id(child) in new:
                node[key] = new[id(child)]
    elif isinstance(node, tuple) and any(id(child) in new for child in node):
        raise TypeError("a layer to replace sits in a tuple; hold it in an nnx.List or a list instead")


def _swap_modules(root, convert):
    """Graph surgery: each module m (path p) with convert(p, m) not None is replaced by it, in place.
    Returns the root (its replacement when the root itself is converted)."""
    new = {}
    for path, module in list(nnx.iter_modules(root)):
        replacement = convert(path, module)
        if replacement is not None:
            new[id(module)] = replacement
    if id(root) in new:
        return new[id(root)]
    for _, node in list(nnx.iter_graph(root)):
        _relink(node, new)
    return root


def _to_lowrank(module, low_cls, fields, node):
    """The low-rank module for a Linear/LinearGeneral (or a low-rank one whose rank changes) with factors
    node["A"], node["B"] (bias: node's or kept). From a dense layer A, B are `Variable.replace`s of the
    kernel (same type, metadata; sharding names split), from a low-rank one of its A, B."""
    a, b = node["A"], node["B"]
    n_in = len(_tuple(module.in_features))
    new = _abstract(low_cls, module, fields, rank=int(np.shape(a)[-1]))
    if isinstance(module, low_cls):
        new.A, new.B = module.A.replace(a), module.B.replace(b)
    else:
        a_meta, b_meta = _split_names(module.kernel, np.ndim(a) - 1 - n_in, n_in)
        new.A, new.B = module.kernel.replace(a, **a_meta), module.kernel.replace(b, **b_meta)
    if module.bias is not None:
        new.bias = module.bias.replace(node["bias"]) if "bias" in node else module.bias.replace()
    return new


def _to_dense(module, dense_cls, fields, kernel, bias):
    """The dense twin of a low-rank module with `kernel` (None: A B per slice) and bias (None: kept)."""
    n_in = len(_tuple(module.in_features))
    n_s = np.ndim(module.A.get_value()) - 1 - n_in
    if kernel is None:
        kernel = factor_product(module.A.get_value(), module.B.get_value(), n_in)
    new = _abstract(dense_cls, module, fields)
    new.kernel = module.A.replace(kernel, **_join_names(module.A, module.B, n_s))
    if module.bias is not None:
        new.bias = module.bias.replace(bias) if bias is not None else module.bias.replace()
    return new


def _is_factorized(node) -> bool:
    return isinstance(node, Mapping) and "A" in node and "B" in node and "kernel" not in node


def lowrank_nnx(model, tree):
    """The user's nnx model running a factorized tree: each `nnx.Linear` / `nnx.LinearGeneral` (exact types)
    whose node in `tree` holds A, B becomes a `LowRankLinear` / `LowRankLinearGeneral` with the same config;
    then all of `tree` is loaded. In place (nnx modules are mutable); returns the model (the new module when
    the model itself is one such layer). Shared layers are replaced wherever they are referenced.

    tree: a pure dict (`nnx.to_pure_dict(nnx.state(model))` passed through `factorize`), an nnx.State, or a
    mix with Variable leaves; it may be partial (only the given leaves are loaded). Low-rank modules whose
    factors change rank (`reduce_rank`) are rebuilt with the new rank. For d = 64, rank 8:

        before: nnx.state(model)                       after lowrank_nnx(model, factorized)
        mlp.up = Linear(64, 256)                       mlp.up = LowRankLinear(64, 256, rank=8)
          kernel Param (64, 256) ('embed', 'mlp')        A Param (64, 8) ('embed', None)
                                                         B Param (8, 256) (None, 'mlp')
          bias   Param (256,)                            bias Param (256,)
        attn.q = LinearGeneral(64, (4, 16))            attn.q = LowRankLinearGeneral(64, (4, 16), rank=8)
          kernel Param (64, 4, 16)                       A Param (64, 8)   B Param (8, 4, 16)
        attn.o = LinearGeneral((4, 16), 64, axis=(-2, -1))
          kernel Param (4, 16, 64)                       A Param (4, 16, 8)   B Param (8, 64)
        layers (nnx.vmap-stacked Linear): kernel (L, 64, 256)  ->  A (L, 64, 8), B (L, 8, 256)

    A and B are `Variable.replace`s of the kernel: the same Variable type and metadata, the out_sharding axis
    names split as kernel S + I + O -> A S + I + (None,), B S + (None,) + O (len(I) = 1 for Linear, else
    len(in_features)), so the state goes out and comes back with the same leaf types.
    """
    tree = _pure(tree)

    def convert(path, module):
        node = _lookup(tree, path)
        if not _is_factorized(node):
            return None
        for dense_cls, low_cls, fields in _PAIRS:
            rank_changes = type(module) is low_cls and np.shape(node["A"])[-1] != module.rank
            if type(module) is dense_cls or rank_changes:
                return _to_lowrank(module, low_cls, fields, node)
        return None

    model = _swap_modules(model, convert)
    _load(model, tree)
    return model


def dense_nnx(model, tree=None):
    """The inverse of `lowrank_nnx`: each `LowRankLinear` / `LowRankLinearGeneral` back to `nnx.Linear` /
    `nnx.LinearGeneral` with the same config, in place (returns the model, as `lowrank_nnx`).

    tree None: every low-rank module, kernel = A B per slice (`factor_product`: S + I + O from A S + I + (r,),
    B S + (r,) + O). tree given (e.g. `densify`'s output): the modules whose node holds a kernel, then all of
    `tree` loaded. The kernel Variable is a `replace` of A (type, metadata), its sharding names A's without the
    rank axis followed by B's output names, so dense -> lowrank -> dense restores the original metadata.
    """
    tree = None if tree is None else _pure(tree)

    def convert(path, module):
        for dense_cls, low_cls, fields in _PAIRS:
            if type(module) is not low_cls:
                continue
            if tree is None:
                return _to_dense(module, dense_cls, fields, None, None)
            node = _lookup(tree, path)
            if isinstance(node, Mapping) and "kernel" in node:
                return _to_dense(module, dense_cls, fields, node["kernel"], node.get("bias"))
        return None

    model = _swap_modules(model, convert)
    if tree is not None:
        _load(model, tree)
    return model
