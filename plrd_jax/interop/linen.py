"""Factorized params in a user's `flax.linen` model: drop-in low-rank layers and an interceptor for unmodified ones.

`plrd_jax.transforms.factorize` turns a dense node `{"kernel": K, "bias": c}` into `{"A": A, "B": B, "bias": c}`
with K ≈ A B. For a kernel of shape S + I + O (S: stacked/batch axes, I: the axes contracted with the input,
O: the output features; linen's `DenseGeneral` kernel is batch_shape + in_shape + features) the factors are

    A: S + I + (r,)        B: S + (r,) + O        y = (x ·_I A) ·_r B + bias

so a 2-D `Dense` kernel (d_in, d_out) becomes A (d_in, r), B (r, d_out). `flax.linen.Dense` only knows
`kernel`, so such a tree fails to apply. Two ways back into linen:

* `LowRankDense`, `LowRankDenseGeneral`: layers with the same call semantics and bias param as flax's, holding
  A and B instead of kernel (for models written, or rewritten, with them).
* `lowrank_linen(module)` / `lowrank_scope()`: the user's module class unchanged; a method interceptor
  (`nn.intercept_methods`) catches `nn.Dense.__call__` / `nn.DenseGeneral.__call__` of every instance whose
  params hold A and B and no kernel and computes x A B (+ bias) there, so one model applies dense,
  factorized and mixed trees alike, inside `nn.scan` / `nn.vmap` / `nn.remat` stacks too (the lifted
  transforms slice the layer axis off A and B as they do off a kernel).

The shared math (`lowrank_contract`, `apply_factors`, `factor_product`) is also what the nnx layers use.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from flax.linen.dtypes import promote_dtype
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from plrd_jax.nn.linears import BOTTLENECK

__all__ = ["lowrank_contract", "apply_factors", "factor_product", "LowRankDense", "LowRankDenseGeneral",
           "lowrank_interceptor", "lowrank_scope", "LowRankModel", "lowrank_linen"]

Initializer = Callable[..., jax.Array]
default_init = nn.initializers.lecun_normal()


# ---- the math, shared with plrd_jax.interop.nnx ---------------------------------------------------
def canonical_axes(ndim: int, axis: Sequence[int] | int, batch_dims: Sequence[int] | int = ()):
    """(axis, batch_dims) as sorted non-negative tuples, as flax's DenseGeneral normalizes them; batch dims
    must be the leading axes 0..k-1 of x (they pair with the kernel's leading S axes)."""
    axis = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    batch = tuple(batch_dims) if isinstance(batch_dims, Sequence) else (batch_dims,)
    axis, batch = (tuple(sorted(a % ndim for a in t)) for t in (axis, batch))
    if batch and batch != tuple(range(len(batch))):
        raise ValueError(f"batch_dims {batch} must be consecutive leading dimensions starting from 0")
    return axis, batch


def lowrank_contract(x, a, b, axis: tuple[int, ...], batch_dims: tuple[int, ...] = (), *, precision=None,
                     dot_general=lax.dot_general, out_kwargs: dict | None = None, **dot_kwargs):
    """y = (x ·_axis A) ·_r B without forming A B.

    x: (…) with `axis` contracted against A's I axes and `batch_dims` (leading, length k) paired with A's and
    B's first k axes S; A: S + I + (r,), B: S + (r,) + O. The bottleneck h = x A, shape S + rest + (r,), is
    tagged `BOTTLENECK` for remat policies. Output: S + rest + O, the layout of flax's DenseGeneral (rest: the
    axes of x neither contracted nor batched). Costs r·(prod I + prod O) multiply-adds per output row instead
    of prod I · prod O. `out_kwargs` go to the second product only (e.g. nnx's out_sharding, shaped for y).
    """
    nb = len(batch_dims)
    batch_ind = tuple(range(nb))
    contract = tuple(range(nb, nb + len(axis)))
    h = dot_general(x, a, ((axis, contract), (batch_dims, batch_ind)), precision=precision, **dot_kwargs)
    h = checkpoint_name(h, BOTTLENECK)
    return dot_general(h, b, (((h.ndim - 1,), (nb,)), (batch_ind, batch_ind)), precision=precision,
                       **dot_kwargs, **(out_kwargs or {}))


def apply_factors(x, a, b, bias, *, axis, batch_dims=(), features: tuple[int, ...], promote: Callable,
                  precision=None, dot_general=lax.dot_general, out_kwargs=None, **dot_kwargs):
    """`lowrank_contract` plus bias, with the layer's dtype promotion, as flax's Dense/DenseGeneral do it.

    promote(x, w, bias) -> (x, w, bias): the layer's `promote_dtype` bound to its dtype, called once with A
    and once with B so that custom promoters written for (inputs, kernel, bias) keep working. bias: None or
    batch_shape + features; it is broadcast over the non-contracted axes of x (1 where x has no batch dim).
    """
    axis, batch_dims = canonical_axes(x.ndim, axis, batch_dims)
    x_, a, bias = promote(x, a, bias)
    _, b, _ = promote(x, b, None)
    y = lowrank_contract(x_, a, b, axis, batch_dims, precision=precision, dot_general=dot_general,
                         out_kwargs=out_kwargs, **dot_kwargs)
    if bias is not None:
        expanded = tuple(x.shape[ax] if ax in batch_dims else 1 for ax in range(x.ndim) if ax not in axis)
        y = y + jnp.reshape(bias, expanded + tuple(features))
    return y


def factor_product(a, b, n_in: int):
    """K = A B per slice: A S + I + (r,), B S + (r,) + O -> K S + I + O, |I| = n_in axes, in float32 (or
    wider) at "highest" precision, cast back to A's dtype. The inverse of the factorization's layout."""
    n_lead = a.ndim - 1 - n_in
    lead, ins, r = a.shape[:n_lead], a.shape[n_lead:-1], a.shape[-1]
    outs = b.shape[n_lead + 1:]
    if b.shape[:n_lead + 1] != lead + (r,):
        raise ValueError(f"factors A {a.shape} and B {b.shape} do not share leading axes and rank")
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    k = jnp.matmul(a.reshape(lead + (math.prod(ins), r)).astype(dtype),
                   b.reshape(lead + (r, math.prod(outs))).astype(dtype), precision="highest")
    return k.reshape(lead + ins + outs).astype(a.dtype)


def flat_init(init: Initializer, n_rows: int | None):
    """An initializer for an N-D factor that draws it as the 2-D (prod(shape[:n_rows]), prod(rest)) matrix
    and reshapes, as flax's DenseGeneral does for its kernel (batch axes S folded into the rows: lecun_normal's
    fan-in is prod(S + I) for A, prod(S)·r for B); n_rows None: as the 1-D (prod(shape),) vector (a bias)."""
    def wrapped(key, shape, dtype=jnp.float32):
        flat = ((int(np.prod(shape)),) if n_rows is None else
                (int(np.prod(shape[:n_rows])), int(np.prod(shape[n_rows:]))))
        value = init(key, flat, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)
    return wrapped


# ---- drop-in layers -------------------------------------------------------------------------------
def _linen_promote(module):
    return lambda x, w, bias: module.promote_dtype(x, w, bias, dtype=module.dtype)


class LowRankDense(nn.Module):
    """`nn.Dense` with K = A B: params A (d_in, rank), B (rank, features), bias (features,) — the names and
    shapes `factorize` gives a Dense node, so a factorized tree applies directly. y = (x A) B + bias.

    Default init: A, B lecun_normal (fan-in d_in, resp. rank), so entries of A B have Dense's variance 1/d_in.
    """

    features: int
    rank: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    a_init: Initializer = default_init
    b_init: Initializer = default_init
    bias_init: Initializer = nn.initializers.zeros_init()
    promote_dtype: Callable = promote_dtype
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs (…, d_in) -> (…, features)."""
        a = self.param("A", self.a_init, (jnp.shape(inputs)[-1], self.rank), self.param_dtype)
        b = self.param("B", self.b_init, (self.rank, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        return apply_factors(inputs, a, b, bias, axis=-1, features=(self.features,), promote=_linen_promote(self),
                             precision=self.precision, dot_general=self.dot_general)


class LowRankDenseGeneral(nn.Module):
    """`nn.DenseGeneral` with K = A B: A batch_shape + in_shape + (rank,), B batch_shape + (rank,) + features,
    bias batch_shape + features. `axis`, `batch_dims` and the output layout are DenseGeneral's, e.g. a query
    projection features=(heads, head_dim): A (d, r), B (r, heads, head_dim); an output projection
    features=d, axis=(-2, -1): A (heads, head_dim, r), B (r, d).
    """

    features: int | Sequence[int]
    rank: int
    axis: int | Sequence[int] = -1
    batch_dims: Sequence[int] = ()
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    a_init: Initializer = default_init
    b_init: Initializer = default_init
    bias_init: Initializer = nn.initializers.zeros_init()
    promote_dtype: Callable = promote_dtype
    dot_general: Callable = lax.dot_general

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """inputs: batch + … + in_shape (at `axis`) -> batch + rest + features."""
        features = tuple(self.features) if isinstance(self.features, Sequence) else (self.features,)
        axis, batch = canonical_axes(inputs.ndim, self.axis, self.batch_dims)
        s = tuple(inputs.shape[d] for d in batch)
        ins = tuple(inputs.shape[d] for d in axis)
        a = self.param("A", flat_init(self.a_init, len(s + ins)), s + ins + (self.rank,), self.param_dtype)
        b = self.param("B", flat_init(self.b_init, len(s) + 1), s + (self.rank,) + features, self.param_dtype)
        bias = (self.param("bias", flat_init(self.bias_init, None), s + features, self.param_dtype)
                if self.use_bias else None)
        return apply_factors(inputs, a, b, bias, axis=axis, batch_dims=batch, features=features,
                             promote=_linen_promote(self), precision=self.precision, dot_general=self.dot_general)


# ---- the interceptor: unmodified nn.Dense / nn.DenseGeneral running factors ----------------------------
_DENSE_CALL = nn.Dense.__call__.__wrapped__  # the raw methods, as the interceptor context sees them
_GENERAL_CALL = nn.DenseGeneral.__call__.__wrapped__


def _expect(key, shape, dtype=jnp.float32):
    """An 'initializer' only ever evaluated abstractly: flax checks an existing param's shape against it."""
    del key
    return jnp.zeros(shape, dtype)


def _holds_factors(module: nn.Module) -> bool:
    return (module.scope is not None and module.has_variable("params", "A")
            and module.has_variable("params", "B") and not module.has_variable("params", "kernel"))


def _rank(module: nn.Module) -> int:
    return int(np.shape(meta.unbox(module.get_variable("params", "A")))[-1])


def _dot_general(module: nn.Module):
    if module.dot_general_cls is not None:
        raise NotImplementedError(f"{module.path}: a factorized {type(module).__name__} with dot_general_cls "
                                  "(e.g. quantized matmuls) is not supported; pass dot_general instead")
    return module.dot_general or lax.dot_general


def _dense_factors(module: nn.Dense, inputs: jax.Array) -> jax.Array:
    """nn.Dense.__call__ on A (d_in, r), B (r, features), bias (features,): y = x A B + bias."""
    r, f = _rank(module), module.features
    a = module.param("A", _expect, (jnp.shape(inputs)[-1], r), module.param_dtype)
    b = module.param("B", _expect, (r, f), module.param_dtype)
    bias = module.param("bias", module.bias_init, (f,), module.param_dtype) if module.use_bias else None
    return apply_factors(inputs, a, b, bias, axis=-1, features=(f,), promote=_linen_promote(module),
                         precision=module.precision, dot_general=_dot_general(module))


def _general_factors(module: nn.DenseGeneral, inputs: jax.Array) -> jax.Array:
    """nn.DenseGeneral.__call__ on A S + I + (r,), B S + (r,) + O, bias S + O (S = batch_shape)."""
    features = tuple(module.features) if isinstance(module.features, Sequence) else (module.features,)
    axis, batch = canonical_axes(inputs.ndim, module.axis, module.batch_dims)
    s, ins, r = tuple(inputs.shape[d] for d in batch), tuple(inputs.shape[d] for d in axis), _rank(module)
    a = module.param("A", _expect, s + ins + (r,), module.param_dtype)
    b = module.param("B", _expect, s + (r,) + features, module.param_dtype)
    bias = (module.param("bias", flat_init(module.bias_init, None), s + features, module.param_dtype)
            if module.use_bias else None)
    return apply_factors(inputs, a, b, bias, axis=axis, batch_dims=batch, features=features,
                         promote=_linen_promote(module), precision=module.precision,
                         dot_general=_dot_general(module))


_HANDLERS = {_DENSE_CALL: _dense_factors, _GENERAL_CALL: _general_factors}


def lowrank_interceptor(next_fun, args, kwargs, context):
    """A `nn.intercept_methods` interceptor: a call of `nn.Dense.__call__` / `nn.DenseGeneral.__call__` (also
    inherited by a subclass, or reached by its `super().__call__`) on a module whose params hold A and B and no
    kernel computes with the factors; every other call goes on unchanged. Shapes of A, B are checked by flax
    against the layer's (ScopeParamShapeError on a mismatch, e.g. a layer axis that was not scanned over)."""
    handler = _HANDLERS.get(getattr(context.orig_method, "func", None))
    if handler is None or not _holds_factors(context.module):
        return next_fun(*args, **kwargs)
    return handler(context.module, *args, **kwargs)


@contextlib.contextmanager
def lowrank_scope():
    """While active, every Dense/DenseGeneral applied with A, B params computes x A B (+ bias).

    For calls `lowrank_linen` does not cover, e.g. `with lowrank_scope(): model.apply(p, x, method=model.encode)`.
    It acts while flax traces: a function jitted elsewhere must be traced (first called with a factorized
    tree) inside the scope; its trace then keeps the low-rank computation, as a dense tree's needs none."""
    with nn.intercept_methods(lowrank_interceptor):
        yield


class LowRankModel(nn.Module):
    """`lowrank_base` run under `lowrank_scope`, sharing its scope: the wrapper adds no level to the param
    tree, so `LowRankModel(m).apply(v, x)` takes exactly the variables `m.apply` takes, with any
    Dense/DenseGeneral node factorized or not; `init` gives `m.init`'s (dense) tree. (The field's name is
    reserved in that shared scope, hence an unlikely one: a top-level submodule may not be called so.)"""

    lowrank_base: nn.Module

    def setup(self):
        nn.share_scope(self, self.lowrank_base)

    def __call__(self, *args, **kwargs):
        with lowrank_scope():
            return self.lowrank_base(*args, **kwargs)


def lowrank_linen(module: nn.Module) -> LowRankModel:
    """The user's (unmodified) linen module, made to run factorized Dense/DenseGeneral params.

    Like levanter's `loraize`, but the model's code and tree layout stay as they are; only the leaves of
    factorized nodes change. For a model whose `mlp` uses `nn.Dense(256)` and whose `attn` uses
    `nn.DenseGeneral((4, 16), name="query")` and `nn.DenseGeneral(64, axis=(-2, -1), name="out")` (d = 64):

        before: model.init(key, x)["params"]         after factorize(params, {path: 8 for each})
        mlp/Dense_0:  kernel (64, 256)   bias (256,)   A (64, 8)    B (8, 256)      bias (256,)
        attn/query:   kernel (64, 4, 16) bias (4, 16)  A (64, 8)    B (8, 4, 16)    bias (4, 16)
        attn/out:     kernel (4, 16, 64) bias (64,)    A (4, 16, 8) B (8, 64)       bias (64,)
        scanned layers/Dense_0: kernel (L, 64, 256)    A (L, 64, 8) B (L, 8, 256)   bias (L, 256)

        y = lowrank_linen(model).apply({"params": factorized}, x)   # == model.apply with kernel = A B

    No params are needed to build it: which layers run factorized is read from the variables at each apply,
    so one wrapper serves any tree (a jit of its apply traces once per tree structure). Covered: `nn.Dense`, `nn.DenseGeneral` (axis,
    batch_dims, dtype/param_dtype, precision, promote_dtype, dot_general, boxed `nn.Partitioned` params), in
    compact or setup-defined submodules and under `nn.scan`/`nn.vmap`/`nn.remat`/`nn.jit`. Not covered: other
    layers (`nn.Einsum`, `nn.Conv`, `nn.Embed.attend`, a model's own dense class calling `self.param("kernel")`
    such as MaxText's `DenseGeneral`), `dot_general_cls` (raises), and an interceptor pushed after this one
    does not see a factorized call (it is answered without calling the next interceptor).
    """
    return LowRankModel(module)
