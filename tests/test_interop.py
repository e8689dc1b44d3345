"""plrd_jax.interop: factorized trees run in a user's own linen / nnx model.

References are independent of the code under test: the dense model itself (full-rank factors must reproduce
it to float32 round-off) and a float64 numpy forward pass computing x·A·B per linear (lower rank).
N-D (DenseGeneral / LinearGeneral, stacked) kernels are factorized by hand in numpy with the transforms'
layout K S + I + O -> A S + I + (r,), B S + (r,) + O; 2-D ones with `plrd_jax.transforms.factorize`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from plrd_jax.interop import (LowRankDense, LowRankDenseGeneral, LowRankLinear, LowRankLinearGeneral, dense_nnx,
                              lowrank_linen, lowrank_nnx)
from plrd_jax.transforms.factorize import densify, factorize, reduce_rank

D, H, DH, T, NB = 16, 2, 4, 5, 2  # model width, heads, head dim, sequence, batch
# path -> number of contracted input axes of the kernel (its I); every kernel here contracts x's last axes
N_IN = {"attn/query": 1, "attn/key": 1, "attn/value": 1, "attn/out": 2, "mlp/up": 1, "mlp/down": 1}
SHARDING = {"attn/query": ("embed", "heads", "kv"), "attn/key": ("embed", "heads", "kv"),
            "attn/value": ("embed", "heads", "kv"), "attn/out": ("heads", "kv", "embed"),
            "mlp/up": ("embed", "mlp"), "mlp/down": ("mlp", "embed")}


# ---- references ----------------------------------------------------------------------------------
def get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def put(tree, path, value):
    """A copy of the nested dict `tree` with tree[path] = value."""
    head, _, rest = path.partition("/")
    return {**tree, head: put(tree[head], rest, value) if rest else value}


def hand_factors(kernel, n_s: int, n_in: int, r: int):
    """Balanced truncated SVD of each slice of K (S + I + O) as a (prod I, prod O) matrix, in float64."""
    k = np.asarray(kernel, np.float64)
    lead, ins, outs = k.shape[:n_s], k.shape[n_s:n_s + n_in], k.shape[n_s + n_in:]
    mats = k.reshape((-1, math.prod(ins), math.prod(outs)))
    a, b = [], []
    for m in mats:
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        a.append(u[:, :r] * np.sqrt(s[:r]))
        b.append(np.sqrt(s[:r])[:, None] * vt[:r])
    return np.reshape(a, lead + ins + (r,)), np.reshape(b, lead + (r,) + outs)


def factorize_tree(params, ranks, n_in=N_IN, n_s=0):
    """ranks: path -> r. 2-D unstacked kernels through plrd_jax's `factorize`, the rest by hand."""
    two_d = {p: r for p, r in ranks.items() if n_s == 0 and get(params, p)["kernel"].ndim == 2}
    out, _ = factorize(params, two_d)
    for path, r in ranks.items():
        if path not in two_d:
            node = get(params, path)
            a, b = hand_factors(node["kernel"], n_s, n_in[path], r)
            dtype = node["kernel"].dtype
            out = put(out, path, {**{k: v for k, v in node.items() if k != "kernel"},
                                  "A": jnp.asarray(a, dtype), "B": jnp.asarray(b, dtype)})
    return out


def densify_tree(params, paths, n_in=N_IN, n_s=0):
    """plrd_jax's `densify`, then kernel = A B (numpy, per slice) for the nodes it leaves factorized."""
    out, _ = densify(params)
    for path in paths:
        node = get(out, path)
        if "A" in node:
            a, b = np.asarray(node["A"], np.float64), np.asarray(node["B"], np.float64)
            lead = a.shape[:n_s]
            k = np.matmul(a.reshape(lead + (-1, a.shape[-1])), b.reshape(lead + (b.shape[n_s], -1)))
            kernel = k.reshape(a.shape[:-1] + b.shape[n_s + 1:])
            out = put(out, path, {"kernel": jnp.asarray(kernel, node["A"].dtype), "bias": node["bias"]})
    return out


def np_linear(x, node, n_in):
    """float64 x ·_I (K or A B) + bias, contracting the last n_in axes of x."""
    lead, f = x.shape[:x.ndim - n_in], lambda k: np.asarray(node[k], np.float64)
    xf = x.reshape(lead + (-1,))
    if "kernel" in node:
        k = f("kernel")
        y = xf @ k.reshape(xf.shape[-1], -1)
        outs = k.shape[n_in:]
    else:
        a, b = f("A"), f("B")
        y = (xf @ a.reshape(xf.shape[-1], -1)) @ b.reshape(b.shape[0], -1)
        outs = b.shape[1:]
    return y.reshape(lead + outs) + f("bias")


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_forward(params, x):
    """The test model in float64: h = x + attention(x), y = h + mlp(h)."""
    x = np.asarray(x, np.float64)
    q, k, v = (np_linear(x, params["attn"][n], 1) for n in ("query", "key", "value"))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    h = x + np_linear(np.einsum("bhqk,bkhd->bqhd", w, v), params["attn"]["out"], 2)
    return h + np_linear(np_gelu(np_linear(h, params["mlp"]["up"], 1)), params["mlp"]["down"], 1)


def attention(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DH), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


# ---- the user's linen model (flax layers only) ---------------------------------------------------
class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.DenseGeneral((H, DH), name=n)(x) for n in ("query", "key", "value"))
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(attention(q, k, v))


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(x)))


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x + Attn(name="attn")(x)
        return h + Mlp(name="mlp")(h)


def full_rank(params, n_s=0):
    """path -> min(prod I, prod O) of each kernel."""
    out = {}
    for path, n_in in N_IN.items():
        shape = get(params, path)["kernel"].shape[n_s:]
        out[path] = min(math.prod(shape[:n_in]), math.prod(shape[n_in:]))
    return out


@pytest.fixture(scope="module")
def linen_setup():
    x = jax.random.normal(jax.random.key(1), (NB, T, D))
    return Model(), Model().init(jax.random.key(0), x)["params"], x


def test_linen_tree_and_init_keep_the_users_layout(linen_setup):
    model, params, x = linen_setup
    wrapped = lowrank_linen(model)
    assert jax.tree.map(jnp.shape, wrapped.init(jax.random.key(0), x)["params"]) == jax.tree.map(jnp.shape, params)
    fact = factorize_tree(params, {p: 3 for p in N_IN})
    assert get(fact, "attn/query")["A"].shape == (D, 3) and get(fact, "attn/query")["B"].shape == (3, H, DH)
    assert get(fact, "attn/out")["A"].shape == (H, DH, 3) and get(fact, "attn/out")["B"].shape == (3, D)
    with pytest.raises(Exception):  # the problem being solved: flax's own layers cannot apply it
        model.apply({"params": fact}, x)


def test_linen_full_rank_equals_dense(linen_setup):
    model, params, x = linen_setup
    fact = factorize_tree(params, full_rank(params))
    y = jax.jit(lowrank_linen(model).apply)({"params": fact}, x)
    np.testing.assert_allclose(y, model.apply({"params": params}, x), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("paths", [tuple(N_IN), ("attn/out", "mlp/up")])  # all, or a mix of dense/factorized
def test_linen_low_rank_equals_numpy(linen_setup, paths):
    model, params, x = linen_setup
    fact = factorize_tree(params, {p: 3 for p in paths})
    y = lowrank_linen(model).apply({"params": fact}, x)
    np.testing.assert_allclose(y, np_forward(fact, x), rtol=1e-5, atol=2e-5)
    assert np.abs(np_forward(fact, x) - np_forward(params, x)).max() > 1e-2  # rank 3 really differs


def test_linen_drop_in_layers_match_factorized_nodes(linen_setup):
    _, params, x = linen_setup
    fact = factorize_tree(params, {p: 3 for p in N_IN})
    layers = {"attn/query": LowRankDenseGeneral((H, DH), rank=3), "mlp/up": LowRankDense(4 * D, rank=3),
              "attn/out": LowRankDenseGeneral(D, rank=3, axis=(-2, -1))}
    for path, layer in layers.items():
        inp = x if N_IN[path] == 1 else x[..., :H * DH].reshape(NB, T, H, DH)
        shapes = jax.tree.map(jnp.shape, layer.init(jax.random.key(0), inp)["params"])
        assert shapes == jax.tree.map(jnp.shape, get(fact, path))
        np.testing.assert_allclose(layer.apply({"params": get(fact, path)}, inp),
                                   np_linear(np.asarray(inp, np.float64), get(fact, path), N_IN[path]),
                                   rtol=1e-5, atol=1e-5)


def test_linen_dense_general_batch_dims():
    """DenseGeneral with batch_dims: kernel (S=batch, I, O) = (3, 4, 2, 6) -> A (3, 4, 2, r), B (3, r, 6)."""
    x = jax.random.normal(jax.random.key(2), (3, 5, 4, 2))
    layer = nn.DenseGeneral(6, axis=(-2, -1), batch_dims=(0,))
    params = layer.init(jax.random.key(0), x)["params"]
    for r in (6, 2):
        a, b = hand_factors(params["kernel"], 1, 2, r)
        node = {"A": jnp.asarray(a, jnp.float32), "B": jnp.asarray(b, jnp.float32), "bias": params["bias"]}
        y = lowrank_linen(layer).apply({"params": node}, x)
        y_drop_in = LowRankDenseGeneral(6, r, axis=(-2, -1), batch_dims=(0,)).apply({"params": node}, x)
        ref = np.einsum("bnij,bijr,bro->bno", np.asarray(x, np.float64), a, b) + np.asarray(params["bias"])[:, None]
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y_drop_in, ref, rtol=1e-5, atol=1e-5)
        if r == 6:
            np.testing.assert_allclose(y, layer.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


# ---- a scanned linen stack (MaxText-style: params with a leading layer axis) ------------------------
L = 3
STACK_IN = {"layers/up": 1, "layers/down": 1}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(2 * D, name="up")(x))), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return scanned(name="layers")(x, None)[0]


def np_stack(params, x):
    x = np.asarray(x, np.float64)
    for i in range(L):
        layer = jax.tree.map(lambda v: v[i], params["layers"])
        x = x + np_linear(np_gelu(np_linear(x, layer["up"], 1)), layer["down"], 1)
    return x


@pytest.fixture(scope="module")
def stack_setup():
    x = jax.random.normal(jax.random.key(1), (NB, T, D))
    return Stack(), Stack().init(jax.random.key(0), x)["params"], x


def test_scanned_stack(stack_setup):
    model, params, x = stack_setup
    assert params["layers"]["up"]["kernel"].shape == (L, D, 2 * D)
    for r, ref in ((D, model.apply({"params": params}, x)), (3, None)):
        fact = factorize_tree(params, {p: r for p in STACK_IN}, STACK_IN, n_s=1)
        assert fact["layers"]["up"]["A"].shape == (L, D, r) and fact["layers"]["up"]["B"].shape == (L, r, 2 * D)
        y = jax.jit(lowrank_linen(model).apply)({"params": fact}, x)
        np.testing.assert_allclose(y, np_stack(fact, x) if ref is None else ref, rtol=1e-5, atol=2e-5)


# ---- the user's nnx model (flax layers only) -----------------------------------------------------
class Weight(nnx.Param):
    """A user's own Param type: it must survive the round trip."""


def meta(path):
    return {"out_sharding": SHARDING[path], "eager_sharding": False}


class NAttn(nnx.Module):
    def __init__(self, rngs):
        for n in ("query", "key", "value"):
            setattr(self, n, nnx.LinearGeneral(D, (H, DH), rngs=rngs, kernel_metadata=meta(f"attn/{n}")))
        self.out = nnx.LinearGeneral((H, DH), D, axis=(-2, -1), rngs=rngs, kernel_metadata=meta("attn/out"))

    def __call__(self, x):
        return self.out(attention(self.query(x), self.key(x), self.value(x)))


class NMlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, 4 * D, rngs=rngs)
        self.up.kernel = Weight(self.up.kernel.get_value(), **meta("mlp/up"))
        self.down = nnx.Linear(4 * D, D, rngs=rngs, kernel_metadata=meta("mlp/down"))

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


class NModel(nnx.Module):
    def __init__(self, rngs):
        self.attn, self.mlp = NAttn(rngs), NMlp(rngs)

    def __call__(self, x):
        h = x + self.attn(x)
        return h + self.mlp(h)


def leaf_info(model):
    """path -> (Variable type, shape, metadata) of every leaf of nnx.state(model)."""
    return {"/".join(map(str, k)): (type(v), v.get_value().shape, v.get_metadata())
            for k, v in nnx.to_flat_state(nnx.state(model))}


def nnx_pure(model):
    return nnx.to_pure_dict(nnx.state(model))


@pytest.fixture
def nnx_setup():
    x = jax.random.normal(jax.random.key(1), (NB, T, D))
    model = NModel(nnx.Rngs(0))
    return model, nnx_pure(model), x


def test_nnx_full_rank_equals_dense(nnx_setup):
    model, params, x = nnx_setup
    y_dense = model(x)
    model = lowrank_nnx(model, factorize_tree(params, full_rank(params)))
    assert isinstance(model.mlp.up, LowRankLinear) and isinstance(model.attn.out, LowRankLinearGeneral)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), y_dense, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("paths", [tuple(N_IN), ("attn/out", "mlp/up")])
def test_nnx_low_rank_equals_numpy(nnx_setup, paths):
    model, params, x = nnx_setup
    fact = factorize_tree(params, {p: 3 for p in paths})
    model = lowrank_nnx(model, fact)
    np.testing.assert_allclose(model(x), np_forward(fact, x), rtol=1e-5, atol=2e-5)
    assert isinstance(model.attn.query, LowRankLinearGeneral) == ("attn/query" in paths)


def test_nnx_state_round_trip_keeps_leaf_types(nnx_setup):
    """nnx.state -> pure dict -> factorize -> lowrank_nnx -> state -> densify -> dense_nnx: same leaves."""
    model, params, _ = nnx_setup
    before = leaf_info(model)
    model = lowrank_nnx(model, factorize_tree(params, {p: 3 for p in N_IN}))
    mid = leaf_info(model)
    assert all(issubclass(t, nnx.Param) for t, _, _ in mid.values())  # no raw arrays in the state
    for path, n_in in N_IN.items():
        kind, _, kmeta = before[f"{path}/kernel"]
        names = SHARDING[path]
        assert mid[f"{path}/A"][0] is kind and mid[f"{path}/B"][0] is kind
        assert mid[f"{path}/A"][2] == {**kmeta, "out_sharding": names[:n_in] + (None,)}
        assert mid[f"{path}/B"][2] == {**kmeta, "out_sharding": (None,) + names[n_in:]}
        assert mid[f"{path}/bias"] == before[f"{path}/bias"]
    assert mid["mlp/up/A"][0] is Weight
    model = dense_nnx(model, densify_tree(nnx_pure(model), N_IN))
    assert leaf_info(model).keys() == before.keys()
    for key, (kind, shape, metadata) in leaf_info(model).items():
        assert (kind, shape, metadata) == before[key], key


def test_nnx_shared_layer_is_replaced_everywhere():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(D, D, rngs=rngs)
            self.tied = nnx.List([self.proj])

        def __call__(self, x):
            return self.tied[0](self.proj(x))

    model, x = Tied(nnx.Rngs(0)), jnp.ones((2, D))
    params = nnx_pure(model)
    fact = factorize_tree(params, {"proj": 4}, {"proj": 1})
    model = lowrank_nnx(model, fact)
    assert model.tied[0] is model.proj and isinstance(model.proj, LowRankLinear)
    np.testing.assert_allclose(model(x), np_linear(np_linear(np.asarray(x, np.float64), fact["proj"], 1),
                                                   fact["proj"], 1), rtol=1e-5, atol=1e-5)


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.up, self.down = nnx.Linear(D, 2 * D, rngs=rngs), nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(x)))


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def nnx_stack_step(x, block):
    return block(x)


def test_nnx_scanned_stack():
    """nnx.vmap-created layers (kernel (L, d, o)) run by nnx.scan: A (L, d, r), B (L, r, o) per layer."""
    blocks = nnx.vmap(lambda key: NBlock(nnx.Rngs(key)))(jax.random.split(jax.random.key(0), L))
    x = jax.random.normal(jax.random.key(1), (NB, T, D))
    params = {"layers": nnx_pure(blocks)}
    fact = factorize_tree(params, {p: 3 for p in STACK_IN}, STACK_IN, n_s=1)
    blocks = lowrank_nnx(blocks, fact["layers"])
    assert blocks.up.A.shape == (L, D, 3) and isinstance(blocks.down, LowRankLinear)
    np.testing.assert_allclose(nnx_stack_step(x, blocks), np_stack(fact, x), rtol=1e-5, atol=2e-5)
    blocks = dense_nnx(blocks)  # kernel = A B per layer, computed by the library
    np.testing.assert_allclose(nnx_stack_step(x, blocks), np_stack(fact, x), rtol=1e-5, atol=2e-5)


# ---- end to end: factorize -> apply -> heal (optax adam) -> densify ----------------------------------
def heal(loss, params, steps=6):
    """A few adam steps on loss(params); returns (params, losses, first gradients)."""
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value, grads

    state, losses, first = tx.init(params), [], None
    for _ in range(steps):
        params, state, value, grads = step(params, state)
        losses.append(float(value))
        first = grads if first is None else first
    return params, losses, first


def check_healed(losses, grads, paths):
    assert losses[-1] < 0.9 * losses[0], losses
    for path in paths:
        for name in ("A", "B"):
            assert float(jnp.abs(get(grads, path)[name]).max()) > 0, (path, name)


@pytest.mark.parametrize("kind", ["model", "stack"])
def test_linen_end_to_end(linen_setup, stack_setup, kind):
    model, params, x = linen_setup if kind == "model" else stack_setup
    n_in, n_s = (N_IN, 0) if kind == "model" else (STACK_IN, 1)
    target = model.apply({"params": params}, x)
    fact = factorize_tree(params, {p: 3 for p in n_in}, n_in, n_s)
    apply = lowrank_linen(model).apply
    healed, losses, grads = heal(lambda p: jnp.mean((apply({"params": p}, x) - target) ** 2), fact)
    check_healed(losses, grads, n_in)
    dense = densify_tree(healed, n_in, n_in, n_s)
    assert all("kernel" in get(dense, p) and "A" not in get(dense, p) for p in n_in)
    np.testing.assert_allclose(model.apply({"params": dense}, x), apply({"params": healed}, x), rtol=1e-5,
                               atol=2e-5)


def test_nnx_end_to_end(nnx_setup):
    model, params, x = nnx_setup
    target = model(x)
    model = lowrank_nnx(model, factorize_tree(params, {p: 3 for p in N_IN}))
    graphdef, state = nnx.split(model)
    healed, losses, grads = heal(lambda s: jnp.mean((nnx.merge(graphdef, s)(x) - target) ** 2), state)
    check_healed(losses, nnx.to_pure_dict(grads), N_IN)
    nnx.update(model, healed)
    assert all(issubclass(t, nnx.Param) for t, _, _ in leaf_info(model).values())
    y_lowrank = model(x)
    model = dense_nnx(model, densify_tree(nnx_pure(model), N_IN))
    assert isinstance(model.mlp.up, nnx.Linear) and isinstance(model.attn.out, nnx.LinearGeneral)
    np.testing.assert_allclose(model(x), y_lowrank, rtol=1e-5, atol=2e-5)


# ---- flax features the linen interceptor covers (full-rank factors must reproduce the dense layer) ------
class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
                        name="d")(x)


class InSetup(nn.Module):
    def setup(self):
        self.d = nn.Dense(8)

    def __call__(self, x):
        return self.d(x)


class Vmapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.vmap(nn.Dense, in_axes=0, out_axes=0, variable_axes={"params": 0}, split_rngs={"params": True})
        return dense(8, name="d")(x)


class Jitted(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.jit(nn.Dense)(8, name="d")(x)


@pytest.mark.parametrize("module", [Boxed, InSetup, Vmapped, Jitted])
def test_linen_interceptor_covers(module):
    x = jax.random.normal(jax.random.key(1), (3, 2, 4))
    model = module()
    params = model.init(jax.random.key(0), x)["params"]
    kernel = nn.meta.unbox(params["d"]["kernel"])
    a, b = (jnp.asarray(f, jnp.float32) for f in hand_factors(kernel, kernel.ndim - 2, 1, 4))
    if module is Boxed:  # factors keep partitioning boxes: the rank axis unsharded
        a, b = nn.Partitioned(a, ("embed", None)), nn.Partitioned(b, (None, "mlp"))
    fact = {"d": {"A": a, "B": b, "bias": params["d"]["bias"]}}
    np.testing.assert_allclose(lowrank_linen(model).apply({"params": fact}, x), model.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)


def test_linen_uncovered_layer_fails_loudly():
    """Only Dense / DenseGeneral are intercepted: factors under nn.Einsum still ask for the kernel."""
    x = jnp.ones((2, 4))
    model = nn.Einsum((4, 8), "...i,ij->...j")
    params = model.init(jax.random.key(0), x)["params"]
    a, b = hand_factors(params["kernel"], 0, 1, 4)
    with pytest.raises(Exception, match="kernel"):
        lowrank_linen(model).apply({"params": {"A": a, "B": b, "bias": params["bias"]}}, x)


def test_nnx_drop_in_modules_have_the_factorized_layout():
    rngs = nnx.Rngs(0)
    shapes = {"A": (D, 3), "B": (3, 4 * D), "bias": (4 * D,)}
    assert jax.tree.map(jnp.shape, nnx_pure(LowRankLinear(D, 4 * D, 3, rngs=rngs))) == shapes
    general = LowRankLinearGeneral((H, DH), D, 3, axis=(-2, -1), rngs=rngs)
    assert jax.tree.map(jnp.shape, nnx_pure(general)) == {"A": (H, DH, 3), "B": (3, D), "bias": (D,)}
    x = jax.random.normal(jax.random.key(1), (NB, T, H, DH))
    np.testing.assert_allclose(general(x), np_linear(np.asarray(x, np.float64), nnx_pure(general), 2),
                               rtol=1e-5, atol=1e-5)


def test_nnx_rank_reduction_rebuilds_low_rank_modules(nnx_setup):
    """A second stage (reduce_rank on the low-rank state) loads into the same model at the lower rank."""
    model, params, x = nnx_setup
    model = lowrank_nnx(model, factorize_tree(params, {"mlp/up": 6, "mlp/down": 6}))
    lower, _ = reduce_rank(nnx_pure(model), {"mlp/up": 2})
    model = lowrank_nnx(model, lower)
    assert model.mlp.up.rank == 2 and model.mlp.up.A.shape == (D, 2) and model.mlp.down.rank == 6
    assert type(model.mlp.up.A) is Weight and model.mlp.up.A.get_metadata()["out_sharding"] == ("embed", None)
    np.testing.assert_allclose(model(x), np_forward(lower, x), rtol=1e-5, atol=2e-5)


# ---- the transforms' own N-D / stacked factorization (default views) runs as is -------------------------
@pytest.mark.parametrize("kind", ["linen", "stack", "nnx"])
def test_transforms_layout_runs_in_the_users_model(linen_setup, stack_setup, kind):
    """`factorize` / `densify` on the whole tree (DenseGeneral q/k/v/out and the scanned stack by their
    default views): the user's model runs the factors (numpy reference) and the densified tree."""
    if kind == "nnx":
        model, x = NModel(nnx.Rngs(0)), linen_setup[2]
        params = nnx_pure(model)
    else:
        model, params, x = linen_setup if kind == "linen" else stack_setup

    def run(tree):
        return lowrank_nnx(model, tree)(x) if kind == "nnx" else lowrank_linen(model).apply({"params": tree}, x)

    paths, reference = (STACK_IN, np_stack) if kind == "stack" else (N_IN, np_forward)
    fact, _ = factorize(params, {p: 3 for p in paths})
    assert get(fact, next(iter(paths)))["A"].shape[-1] == 3
    np.testing.assert_allclose(run(fact), reference(fact, x), rtol=1e-5, atol=2e-5)
    dense, _ = densify(fact)
    assert all(get(dense, p)["kernel"].shape == get(params, p)["kernel"].shape for p in paths)
    y = dense_nnx(model, dense)(x) if kind == "nnx" else model.apply({"params": dense}, x)
    np.testing.assert_allclose(y, reference(fact, x), rtol=1e-5, atol=2e-5)
