"""The one step builder and the one stage loop (plrd_jax.training.step / loop), on a toy model whose gradient
has a closed form: params {"w": float[V], "idx": int[3]}, loss(tokens) = mean_b,t w[tokens[b, t]]², so
∂loss/∂w_v = 2 w_v · count_v / (B·T)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from plrd_jax.io.store import FamilyStore
from plrd_jax.nn.sharding import make_mesh, replicated
from plrd_jax.training.loop import latest_checkpoint, run_stage, state_layout
from plrd_jax.training.state import init_train_state
from plrd_jax.training.step import make_train_step

V, LR = 12, 0.1


def loss_fn(params, tokens, step, extra):
    values = params["w"][tokens]
    return jnp.mean(values ** 2), {"mean_w": jnp.mean(values)}


def toy(grad_accum=1, post_update=None):
    mesh = make_mesh()
    params = {"w": jnp.linspace(-1.0, 1.0, V, dtype=jnp.float32), "idx": jnp.arange(3, dtype=jnp.int32)}
    shardings = jax.tree.map(lambda _: replicated(mesh), params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    optimizer = optax.sgd(LR)
    step = make_train_step(loss_fn, optimizer, mesh, abstract, shardings, grad_accum=grad_accum,
                           lr_schedule=lambda s: LR, post_update=post_update)
    return params, optimizer, mesh, shardings, abstract, step


def batches(t, grad_accum=1):
    return np.random.default_rng([t, 7]).integers(0, V, size=(grad_accum, 2, 5)).astype(np.int32)


def test_accumulated_step_is_sgd_on_the_mean_gradient_of_the_micro_batches():
    params, optimizer, mesh, shardings, _, step = toy(grad_accum=3)
    state = init_train_state(params, optimizer, mesh, shardings)
    tokens = batches(0, 3)
    state, metrics = step(state, tokens, None)
    w = np.linspace(-1.0, 1.0, V, dtype=np.float64)
    grads, losses = [], []
    for micro in tokens:  # numpy float64 reference
        counts = np.bincount(micro.ravel(), minlength=V)
        grads.append(2 * w * counts / micro.size)
        losses.append(np.mean(w[micro] ** 2))
    expected = w - LR * np.mean(grads, axis=0)
    np.testing.assert_allclose(np.asarray(state.params["w"]), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(state.params["idx"]), [0, 1, 2])  # integer leaves are carried
    assert abs(metrics["loss"] - np.mean(losses)) < 1e-6
    assert abs(metrics["grad_norm"] - np.linalg.norm(np.mean(grads, axis=0))) < 1e-6
    assert int(state.step) == 1 and metrics["lr"] == pytest.approx(LR)


def test_post_update_runs_after_every_update():
    params, optimizer, mesh, shardings, _, step = toy(post_update=lambda p: {**p, "w": jnp.clip(p["w"], -0.5, 0.5)})
    state = init_train_state(params, optimizer, mesh, shardings)
    state, _ = step(state, batches(0), None)
    assert float(jnp.max(jnp.abs(state.params["w"]))) <= 0.5


def test_wrong_token_shape_is_refused():
    params, optimizer, mesh, shardings, _, step = toy(grad_accum=2)
    state = init_train_state(params, optimizer, mesh, shardings)
    with pytest.raises(ValueError, match="grad_accum=2"):
        step(state, batches(0, 1), None)


def test_a_stage_stopped_midway_resumes_bitwise_from_its_checkpoint(tmp_path):
    params, optimizer, mesh, shardings, abstract, step = toy()
    layout = state_layout(abstract, optimizer, mesh, shardings)
    init = lambda: init_train_state(params, optimizer, mesh, shardings)  # noqa: E731
    events = []
    whole = run_stage(step, steps=6, batch_at=batches, init=init, on_event=lambda k, i: events.append(i))
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6] and whole.timed == 5

    store = FamilyStore(tmp_path / "store")
    meta = lambda t, run: {"member": 0, "step": 10 + t, "final": False}  # noqa: E731

    def stop_at_5(t, state, metrics):
        if t == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_stage(step, steps=6, batch_at=batches, init=init, store=store, start=10, save_every=2,
                  checkpoint_meta=meta, after_step=stop_at_5)
    resume = latest_checkpoint(store, 10, 16)
    assert resume == 14  # checkpoints at 12 and 14, none at 15
    resumed = run_stage(step, steps=6, batch_at=batches, init=init, layout=layout, store=store, start=10,
                        resume=resume, final_meta=lambda run: {"member": 0, "step": 16, "final": True})
    assert resumed.resumed_at == 14 and resumed.done == 4 and int(resumed.state.step) == 6
    np.testing.assert_array_equal(np.asarray(resumed.state.params["w"]), np.asarray(whole.state.params["w"]))
    assert 16 in store.steps() and store.metadata(16)["final"]
    store.close()
