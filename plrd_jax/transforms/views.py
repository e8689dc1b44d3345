"""Which arrays of a param tree are matrices, and how each is read as a stack of (d_in, d_out) matrices.

A *matrix node* is a dict holding one weight leaf — `kernel` (flax: d_in axes first) or `weight` (PyTorch /
levanter: (d_out, d_in)) — or the factors `A`, `B` of K = A B, beside an optional `bias`. A `MatrixView` says how
its leaf's axes split:

    kernel  S + I + O          S: `stack` leading stacked axes (scanned layers), I: `n_in` axes contracted with
                               the input, O: the rest (output features); K_s = kernel[s] reshaped (∏I, ∏O)
    weight  (d_out, d_in)      2-D, transposed: K = weightᵀ
    A       S + I + (r,)       the factors of every slice: K_s ≈ A_s B_s, A_s (∏I, r), B_s (r, ∏O)
    B       S + (r,) + O

so a linen `DenseGeneral` query kernel (d, heads, head_dim) is MatrixView(n_in=1), its output kernel
(heads, head_dim, d) MatrixView(n_in=2), and a MaxText-style scanned stack (L, d_in, d_out) MatrixView(stack=1).
All slices of a stack share one rank (the arrays stay rectangular).

Default views (`default_view`), from the path and the leaf alone: a 2-D kernel or factors are (0, 1); a 2-D
`weight` is transposed; under a key named exactly "layers" (a scanned stack) one leading axis is stacked; under
"query", "key" or "value" the leaf's first non-stacked axis is d_in, under "out" all but the last. Any other
N-D leaf is skipped unless `views` ({glob over paths: MatrixView}) gives its view. A node with weights *and*
other keys that a matrix cannot carry (a LoRA `{kernel, A, B}`, an S4 `{A, B, C}`) is skipped with the reason,
never rewritten; `scan_tree` returns the matrices and the skipped nodes.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

COMPANIONS = ("bias",)  # keys a matrix node may hold beside its weights
QKV, OUT = ("query", "key", "value"), ("out",)


class MatrixView(NamedTuple):
    """stack: leading stacked axes; n_in: axes after them forming d_in (None: every axis but the last);
    transposed: a 2-D `weight` stored (d_out, d_in)."""

    stack: int = 0
    n_in: int | None = 1
    transposed: bool = False


class Matrix(NamedTuple):
    """A matrix node: `count` slices (∏ of the stacked axes) of d_in × d_out, rank None when dense."""

    d_in: int
    d_out: int
    rank: int | None
    count: int = 1
    view: MatrixView = MatrixView()

    @property
    def size(self) -> int:
        per = self.d_in * self.d_out if self.rank is None else self.rank * (self.d_in + self.d_out)
        return self.count * per


def _shape(node: Mapping, key: str) -> tuple[int, ...] | None:
    x = node.get(key)
    return tuple(x.shape) if hasattr(x, "shape") else None


def default_view(path: str, node: Mapping) -> MatrixView | None:
    """The view the defaults give `node` at `path` (see the module docstring), or None (skip it)."""
    keys = path.split("/")
    stack = 1 if "layers" in keys[:-1] else 0
    if "weight" in node and "kernel" not in node:
        return MatrixView(transposed=True) if len(_shape(node, "weight") or ()) == 2 else None
    if "kernel" not in node:  # factors: A's axes say where d_in ends
        return MatrixView(stack, None) if len(_shape(node, "A") or ()) >= stack + 2 else None
    rest = len(_shape(node, "kernel")) - stack
    if rest == 2:
        return MatrixView(stack, 1)
    if rest >= 3 and keys[-1] in QKV:
        return MatrixView(stack, 1)
    if rest >= 3 and keys[-1] in OUT:
        return MatrixView(stack, rest - 1)
    return None


def _view_for(path: str, node: Mapping, views: Mapping[str, MatrixView] | None) -> MatrixView | None:
    for pattern, view in (views or {}).items():
        if fnmatch.fnmatchcase(path, pattern):
            return view
    return default_view(path, node)


def describe(path: str, node: Mapping, view: MatrixView) -> Matrix | str:
    """The Matrix of `node` under `view`, or the reason it is not one."""
    extra = sorted(set(node) - {"kernel", "weight", "A", "B"} - set(COMPANIONS))
    if "kernel" in node and ("A" in node or "B" in node):
        return f"holds a kernel beside factors A/B (a LoRA adapter?): {', '.join(sorted(node))}"
    if extra:
        return f"holds {', '.join(extra)} beside its weights; a matrix node may hold only {', '.join(COMPANIONS)}"
    s = view.stack
    if "kernel" in node or "weight" in node:
        shape = _shape(node, "kernel" if "kernel" in node else "weight")
        if view.transposed:
            return Matrix(shape[1], shape[0], None, 1, view) if len(shape) == 2 else f"weight of shape {shape} is not 2-D"
        n_in = len(shape) - s - 1 if view.n_in is None else view.n_in
        if len(shape) < s + n_in + 1 or n_in < 1:
            return f"kernel of shape {shape} has no d_out axes under {view}"
        return Matrix(math.prod(shape[s:s + n_in]), math.prod(shape[s + n_in:]), None, math.prod(shape[:s]), view)
    a, b = _shape(node, "A"), _shape(node, "B")
    if a is None or b is None:
        return "holds only one of the factors A, B"
    if len(a) < s + 2 or len(b) < s + 2 or a[:s] != b[:s] or b[s] != a[-1]:
        return f"factors A {a} and B {b} do not fit A = S + I + (r,), B = S + (r,) + O with {s} stacked axes"
    return Matrix(math.prod(a[s:-1]), math.prod(b[s + 1:]), a[-1], math.prod(a[:s]),
                  view._replace(n_in=len(a) - s - 1))


def _is_candidate(node) -> bool:
    return isinstance(node, Mapping) and any(
        hasattr(node.get(k), "shape") for k in ("kernel", "weight", "A", "B"))


def scan_tree(params, views: Mapping[str, MatrixView] | None = None
              ) -> tuple[dict[str, Matrix], dict[str, str]]:
    """(path -> Matrix for every matrix node, path -> reason for every weight-holding node skipped), in tree
    order. `views` ({glob: MatrixView}) override the defaults and select N-D leaves the defaults skip."""
    found, skipped = {}, {}

    def walk(node, path):
        if _is_candidate(node):
            view = _view_for(path, node, views)
            result = "an N-D kernel with no default view: pass views={pattern: MatrixView(...)}" if view is None \
                else describe(path, node, view)
            if isinstance(result, Matrix):
                found[path] = result
                return
            if any(not isinstance(v, Mapping) for v in node.values()):
                skipped[path] = result
        if isinstance(node, Mapping):
            for key, child in node.items():
                if isinstance(child, Mapping):
                    walk(child, f"{path}/{key}" if path else str(key))

    walk(params, "")
    return found, skipped


def find_matrices(params, views: Mapping[str, MatrixView] | None = None) -> dict[str, Matrix]:
    """Every matrix node of a nested dict, in tree order: path -> Matrix (see `scan_tree`)."""
    return scan_tree(params, views)[0]


# ---- reading a node as a stack of 2-D matrices, and writing factors back ---------------------------------
def kernel_stack(node: Mapping, m: Matrix) -> jax.Array:
    """The dense weights of `node` as (count, d_in, d_out)."""
    if m.view.transposed:
        return node["weight"].T[None]
    return node["kernel"].reshape(m.count, m.d_in, m.d_out)


def factor_stacks(node: Mapping, m: Matrix) -> tuple[jax.Array, jax.Array]:
    """The factors of `node` as A (count, d_in, r), B (count, r, d_out)."""
    return node["A"].reshape(m.count, m.d_in, m.rank), node["B"].reshape(m.count, m.rank, m.d_out)


def leaf_shapes(node: Mapping, m: Matrix) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(S, I + O split as (I, O)) of the node's leaf: the shapes factors and kernels are written back in."""
    if m.view.transposed:
        return (), ((m.d_in,), (m.d_out,))
    if "kernel" in node:
        shape, s, n_in = _shape(node, "kernel"), m.view.stack, m.view.n_in
        n_in = len(shape) - s - 1 if n_in is None else n_in
        return shape[:s], (shape[s:s + n_in], shape[s + n_in:])
    a, b, s = _shape(node, "A"), _shape(node, "B"), m.view.stack
    return a[:s], (a[s:-1], b[s + 1:])


def write_factors(node: Mapping, m: Matrix, a3: jax.Array, b3: jax.Array) -> dict[str, Any]:
    """`node` with its weights replaced by factors A (count, d_in, r), B (count, r, d_out), reshaped to
    S + I + (r,) and S + (r,) + O; bias and the rest kept."""
    stack, (ins, outs) = leaf_shapes(node, m)
    r = a3.shape[-1]
    rest = {k: v for k, v in node.items() if k not in ("kernel", "weight", "A", "B")}
    return {**rest, "A": a3.reshape(*stack, *ins, r), "B": b3.reshape(*stack, r, *outs)}


def write_kernel(node: Mapping, m: Matrix, k3: jax.Array, transposed: bool = False) -> dict[str, Any]:
    """`node` with its weights replaced by the dense (count, d_in, d_out) `k3`: a kernel S + I + O, or a 2-D
    `weight` (d_out, d_in) when `transposed`."""
    stack, (ins, outs) = leaf_shapes(node, m)
    rest = {k: v for k, v in node.items() if k not in ("kernel", "weight", "A", "B")}
    if transposed:
        return {**rest, "weight": k3[0].T}
    return {**rest, "kernel": k3.reshape(*stack, *ins, *outs)}


def batched(fn):
    """fn over 2-D matrices → the same over a leading slice axis (jax.vmap; one slice runs unbatched)."""
    def run(*arrays):
        if arrays[0].shape[0] == 1:
            return jax.tree.map(lambda x: x[None], fn(*(x[0] for x in arrays)))
        return jax.vmap(fn)(*arrays)
    return run


def compute_dtype(x) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)
