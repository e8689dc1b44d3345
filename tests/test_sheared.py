"""The pruning phase: the Lagrangian reaches the target; runs store Sheared members beside PLRD ones and resume
bitwise after SIGKILL; bad input fails before any compute; the real parent prunes to exact shapes that load in
HF transformers with the same logits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import plrd_jax.data.dynamic_loading as dl
import plrd_jax.nn.masks as M
import plrd_jax.methods.l0_pruning as L
import plrd_jax.methods.sheared as S
from plrd_jax.nn.config import ModelConfig
from plrd_jax.nn.model import init_params
from plrd_jax.nn.sharding import make_mesh, param_shardings
from plrd_jax.io.store import FamilyStore, StoreError
from plrd_jax.training.optim import HealConfig
from plrd_jax.transforms.prune import prune

HERE = os.path.dirname(__file__)
GQA = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=4, num_heads=6, num_kv_heads=3,
                  head_dim=8, max_seq_len=64, tie_embeddings=True)


def test_lagrangian_gradient_is_the_constraint_gap():
    log_alpha = M.init_log_alpha(jax.random.key(0), GQA, mean=0.5, std=1.0)
    lambdas = {name: jnp.array([0.3, 0.7]) for name in L.LAGRANGIAN_TERMS}
    targets = {"z_layer": 0.25, "z_int": 0.5}
    (_, sparsity), grad = jax.value_and_grad(L.lagrangian, argnums=1, has_aux=True)(log_alpha, lambdas, targets)
    for name, t in targets.items():  # ∂/∂λ1 = mean(ŝ − t), ∂/∂λ2 = mean((ŝ − t)²)
        s = np.asarray(M.expected_sparsity(M.prob_nonzero(log_alpha))[name])
        np.testing.assert_allclose(grad[name], [np.mean(s - t), np.mean((s - t) ** 2)], rtol=1e-5)
        assert float(sparsity[name]) == pytest.approx(np.mean(s), rel=1e-6)
    assert float(jnp.abs(grad["z_head"]).sum()) == 0.0  # terms without a target do not enter


def test_ramp_is_linear_over_the_first_fifth():
    final = {"z_int": 0.5}
    assert [float(L.ramped_targets(final, s, 20)["z_int"]) for s in (0, 10, 20, 30)] == [0.0, 0.25, 0.5, 0.5]


def test_lagrangian_drives_the_expected_size_to_the_target_within_100_steps():
    """Tiny GQA model (4 layers, d 48, 6 heads / 3 kv, 96) → (3, 32, 4 / 2, 48), ramp over the first 30 steps:
    from step 100 on every term's expected sparsity is within 0.03 of its target and the expected size within
    10% of the target's size (the rest: units at the log α floor still count with P(z > 0) ≈ 0.05)."""
    target = M.TargetShape(3, 32, 4, 48, 2).resolve(GQA)
    mesh, params = make_mesh(), init_params(GQA)
    shardings = param_shardings(params, mesh)
    heal, l0 = HealConfig(lr=1e-3, warmup_steps=0, total_steps=150), L.L0Config(ramp_fraction=0.2)
    state = L.init_prune_state(params, GQA, heal, l0, mesh, shardings)
    step = L.make_prune_step(GQA, target, heal, l0, mesh, shardings, total_steps=150)
    rng = np.random.default_rng(0)
    stream = ((np.arange(150 * 64) * 7 + rng.integers(0, 3, 150 * 64)) % 96).astype(np.int32)
    history = []
    for t in range(150):
        state, metrics = step(state, stream[t * 64:(t + 1) * 64].reshape(1, 4, 16), None)
        history.append({k: float(v) for k, v in metrics.items()})
    assert history[0]["expected_size"] > 3 * history[0]["target_size"]  # starts at the parent's size
    for m in history[100:]:
        for name in L.lagrangian_targets(target, GQA):
            assert abs(m[f"sparsity/{name}"] - m[f"target/{name}"]) < 0.03, (name, m)
        assert abs(m["expected_size"] / m["target_size"] - 1) < 0.10, m
    assert min(m["lambda1/z_int"] for m in history) < 0  # the multiplier ascended against a lagging sparsity
    masks = M.deterministic(state.params["log_alpha"], GQA, target)
    small_params, small_config = prune(state.params["model"], GQA, masks)
    assert small_config == target.config(GQA)


def run(out, *args):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    return subprocess.run([sys.executable, os.path.join(HERE, "shear_run.py"), str(out), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=900)


def test_sheared_members_live_beside_plrd_and_resume_bitwise_after_sigkill(tmp_path):
    clean = run(tmp_path / "clean", "--plrd")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert run(tmp_path / "resumed", "prune", 5).returncode == -9  # checkpoint at 4 holds model, log α, λ
    assert run(tmp_path / "resumed", "continue", 3).returncode == -9  # checkpoint at 2 of continued training
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / "clean" / "result.npz"), np.load(tmp_path / "resumed" / "result.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    weights = [json.loads((tmp_path / d / "weights.json").read_text()) for d in ("clean", "resumed")]
    assert weights[0] == weights[1] and len(weights[0]) > 2

    store = FamilyStore(tmp_path / "clean", read_only=True)
    members = store.members()
    assert [(m["member"], m["method"]) for m in members] == [(0, "plrd"), (S.MEMBER_BASE, "sheared")]
    sheared = members[1]
    assert sheared["config"]["num_layers"] == 1 and sheared["config"]["hidden_size"] == 40
    assert sheared["config"]["num_heads"] == 4 and sheared["config"]["num_kv_heads"] == 2
    from plrd_jax.io.load import load_model

    config, _, _ = load_model(f"{tmp_path / 'clean'}:sheared-a")
    assert config.intermediate_size == 64

    # the PLRD run finds its member again (nothing refused, nothing recomputed)
    from shear_run import CONFIG, PLRD, tiny_domains

    from plrd_jax.data.windows import TokenDataset
    from plrd_jax.methods.plrd import run_family

    domains, evals = tiny_domains()
    events = []
    store = FamilyStore(tmp_path / "clean")
    run_family("tiny", CONFIG, init_params(CONFIG), PLRD, TokenDataset(domains["periodic"], {}), evals, store,
               on_event=lambda kind, info: events.append((kind, info.get("restored"))))
    assert events == [("parent", None), ("member", True)]  # the parent's PPL is read from the store, not recomputed
    # a different Sheared run into the same directory is refused
    from shear_run import SHEAR

    other = S.ShearSchedule(SHEAR.members, SHEAR.domains, batch_size=4, seq_len=16, validation_windows=3)
    with pytest.raises(StoreError, match="another Sheared run"):
        S.run_shear("tiny", CONFIG, init_params(CONFIG), other, domains, evals, store)


def test_bad_input_fails_before_any_compute(tmp_path):
    from shear_run import CONFIG, SHEAR, tiny_domains

    domains, evals = tiny_domains()
    store = FamilyStore(tmp_path / "fam")
    events = []

    def attempt(schedule, data=domains):
        S.run_shear("tiny", CONFIG, init_params(CONFIG), schedule, data, evals, store,
                    on_event=lambda kind, info: events.append(kind))

    too_big = S.ShearMember("x", M.TargetShape(2, 64, 4, 64, 2), 64, 64)
    with pytest.raises(M.ShapeError, match="hidden_size 64 must be an integer in \\[1, 48\\]"):
        attempt(S.ShearSchedule((too_big,), SHEAR.domains, seq_len=16))
    odd_heads = S.ShearMember("x", M.TargetShape(2, 40, 5, 64, 2), 64, 64)
    with pytest.raises(M.ShapeError, match="num_heads 5 is not a multiple of num_kv_heads 2"):
        attempt(S.ShearSchedule((odd_heads,), SHEAR.domains, seq_len=16))
    breaks_gqa = S.ShearMember("x", M.TargetShape(2, 40, 3, 64, 1), 64, 64)
    with pytest.raises(M.ShapeError, match="more than the parent's 2"):
        attempt(S.ShearSchedule((breaks_gqa,), SHEAR.domains, seq_len=16))
    with pytest.raises(dl.DomainError, match="no data for domain"):
        attempt(SHEAR, {"periodic": domains["periodic"]})
    assert events == [] and store.steps() == []


@pytest.mark.slow
def test_embedded_parent_prunes_to_exact_shapes_that_load_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.model import Decoder

    config, params, tokenizer = load_model("smollm2-135m")
    tokens = np.asarray(tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3), np.int32)[None]
    for member in S.PRESETS["sheared-smollm2"].members:
        target = member.target.resolve(config)
        log_alpha = {name: jax.random.uniform(jax.random.key(i), s, minval=-4.0, maxval=4.0)
                     for i, (name, s) in enumerate(M.mask_shapes(config).items())}
        masks = M.deterministic(log_alpha, config, target)
        small_params, small_config = prune(params, config, masks)
        assert small_config == target.config(config)
        masked = np.asarray(Decoder(config).apply({"params": params}, tokens, masks=masks))
        ours = np.asarray(Decoder(small_config).apply({"params": small_params}, tokens))
        np.testing.assert_allclose(ours, masked, rtol=1e-4, atol=1e-4)
        out = tmp_path / member.name
        save_hf(small_params, small_config, out, tokenizer=tokenizer)
        hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3)


def test_cli_refuses_bad_targets_domains_and_reference_losses_in_one_line(tmp_path, capsys):
    from shear_run import CONFIG

    from plrd_jax.cli import main
    from plrd_jax.io.hf import save_hf

    parent = tmp_path / "parent"
    save_hf(init_params(CONFIG), CONFIG.replace(vocab_size=96), parent)
    out = tmp_path / "out"
    cases = [(["--target", "3,48,6,3,96"], "target num_layers 3 must be an integer in [1, 2]"),
             (["--target", "2,48,4,3,96"], "num_heads 4 is not a multiple of num_kv_heads 3"),
             (["--target", "2,48,4,1,96"], "4 query heads per kv group, more than the parent's 2"),
             (["--target", "2,48,6"], "expected LAYERS,HIDDEN,HEADS,KV_HEADS,INTERMEDIATE"),
             (["--target", "1,48,6,3,96", "--domains", "wikitext,github"], "unknown domain 'github'"),
             (["--target", "1,48,6,3,96", "--reference-losses", "wikitext=3,books=3,speeches=2,arxiv=2"],
              "reference losses given for arxiv"),
             (["--target", "1,48,6,3,96", "--reference-losses", "wikitext=3"], "no reference loss for books, speeches")]
    for extra, message in cases:
        assert main(["shear", "--parent", str(parent), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (extra, err)
    assert not out.exists()
