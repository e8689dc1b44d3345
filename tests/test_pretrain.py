"""Pretraining from scratch: preset sizes against the papers, recipes, remat, compiled memory, a resumable run."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plrd_jax.nn.config import ConfigError
from plrd_jax.nn.model import Decoder
from plrd_jax.data.batches import StreamedBatches, WindowBatches
from plrd_jax.methods.pretrain import PRESETS, PretrainError, count_trainable, init_params, model_config, parameter_counts, pretrain, recipe
from plrd_jax.training.compile import compile_train_step
from plrd_jax.io.store import FamilyStore
from plrd_jax.training.losses import next_token_loss

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=2)


def preset_params(preset, method):
    config = model_config(preset, recipe(preset, method))
    return jax.eval_shape(lambda: init_params(config))


# ---- sizes --------------------------------------------------------------------------------------
# Millions of parameters as published, with the precision they are published to: CoLA (Table 1: 42.8, 94.0,
# 185.2, 609.3), SLTrain (its parameter-size rows: 58/134/368/1339 full rank, 43/94/185/609 low rank,
# 44/97/194/646 SLTrain).
PUBLISHED = [
    ("llama-60m", "cola", 42.8, 0.05), ("llama-130m", "cola", 94.0, 0.05), ("llama-350m", "cola", 185.2, 0.05),
    ("llama-1b", "cola", 609.3, 0.05),
    ("llama-60m", "full", 58, 0.5), ("llama-130m", "full", 134, 0.5), ("llama-350m", "full", 368, 0.5),
    ("llama-1b", "full", 1339, 0.5),
    ("llama-60m", "lowrank", 43, 0.5), ("llama-130m", "lowrank", 94, 0.5), ("llama-350m", "lowrank", 185, 0.5),
    ("llama-1b", "lowrank", 609, 0.5),
    ("llama-60m", "sltrain", 44, 0.5), ("llama-130m", "sltrain", 97, 0.5), ("llama-350m", "sltrain", 194, 0.5),
    ("llama-1b", "sltrain", 646, 0.55),
]


@pytest.mark.parametrize("preset,method,millions,tolerance", PUBLISHED)
def test_preset_parameter_counts_match_the_papers(preset, method, millions, tolerance):
    assert abs(count_trainable(preset_params(preset, method)) / 1e6 - millions) <= tolerance


def test_sltrain_adds_floor_of_delta_times_each_matrix_to_the_low_rank_count():
    p = PRESETS["llama-60m"]
    config = model_config("llama-60m", recipe("llama-60m", "sltrain"))
    nnz = sum(int(0.03 * config.matrix_shape(path)[0] * config.matrix_shape(path)[1])
              for path in config.matrix_paths(include_head=False))
    assert nnz == p.num_layers * (4 * int(0.03 * 512 * 512) + 3 * int(0.03 * 512 * 1376))
    assert count_trainable(preset_params("llama-60m", "sltrain")) - count_trainable(
        preset_params("llama-60m", "lowrank")) == nnz
    counts = parameter_counts(preset_params("llama-60m", "cola"))
    assert counts["embedding"] == counts["lm_head"] == 32000 * 512  # untied, dense


# ---- recipes ------------------------------------------------------------------------------------
def test_recipes_follow_the_papers():
    cola = recipe("llama-60m", "cola")
    assert (cola.lr, cola.weight_decay, cola.clip, cola.warmup_steps, cola.rank) == (6e-3, 0.01, 0.5, 2000, 128)
    assert recipe("llama-1b", "cola-m").remat == "bottleneck" and recipe("llama-1b", "cola").lr == 2e-3
    assert recipe("llama-350m", "cola").only_lr_act and not recipe("llama-130m", "cola").only_lr_act
    sl = recipe("llama-130m", "sltrain")
    assert (sl.lr, sl.weight_decay, sl.rank, sl.density, sl.alpha, sl.warmup_steps) == (3e-3, 0.0, 256, 0.03, 16, 2000)
    heal = recipe("llama-60m", "full").heal_config(grad_accum=4)
    assert (heal.lr, heal.b2, heal.end_lr_fraction, heal.clip, heal.dtype) == (1e-3, 0.999, 0.1, None, "bfloat16")
    assert recipe("llama-60m", "full").tokens_per_step == 512 * 256


def test_bad_presets_methods_ranks_and_densities_are_one_line_errors():
    cases = [(lambda: recipe("llama-7b", "cola"), PretrainError, "unknown preset 'llama-7b'"),
             (lambda: recipe("llama-60m", "galore"), PretrainError, "unknown method 'galore'; expected one of"),
             (lambda: model_config("llama-60m", recipe("llama-60m", "cola", rank=512)), ConfigError,
              r"rank 512 for layers_0/attn/q \(512×512\) must be in 1..511"),
             (lambda: model_config("llama-60m", recipe("llama-60m", "sltrain", density=1.0)), ConfigError,
              "density 1.0 .* strictly between 0 and 1")]
    for make, error, message in cases:
        with pytest.raises(error, match=message) as err:
            make()
        assert "\n" not in str(err.value)


# ---- remat --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "lowrank", "cola", "sltrain"])
def test_every_remat_policy_leaves_the_gradient_unchanged(method):
    base = model_config("llama-20m", recipe("llama-20m", method, rank=8), **TINY)
    params = init_params(base, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)

    def grads(config):
        loss = lambda p: next_token_loss(Decoder(config).apply({"params": p}, tokens), tokens)
        return jax.jit(jax.grad(loss, allow_int=True))(params)

    reference = jax.tree.leaves(grads(base))
    for remat in ("full", "dots", "bottleneck"):
        for a, b in zip(reference, jax.tree.leaves(grads(base.replace(remat=remat)))):
            if jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cola_m_compiled_peak_memory_is_below_cola_for_the_same_step():
    shape = dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_layers=2, num_heads=2, num_kv_heads=2)
    peaks = {}
    for method in ("cola", "cola-m"):
        rcp = recipe("llama-20m", method, rank=32, dtype="float32", batch_size=8, seq_len=128)
        config = model_config("llama-20m", rcp, **shape)
        _, memory = compile_train_step(config, rcp.heal_config(), 8, 128)
        peaks[method] = memory["peak"]
    assert peaks["cola-m"] < 0.7 * peaks["cola"], peaks


# ---- a run --------------------------------------------------------------------------------------
def periodic_windows(n=64, seq_len=16, vocab=64, seed=0):
    """Windows of a short repeating token pattern: learnable within a few steps."""
    pattern = np.random.default_rng(seed).integers(0, vocab, 7)
    stream = np.tile(pattern, n * seq_len // 7 + 1)[: n * seq_len]
    return stream.reshape(n, seq_len).astype(np.int32)


def tiny_run(tmp_path, method, steps=4, stop_after=None, name="run"):
    rcp = recipe("llama-20m", method, rank=8, steps=steps, batch_size=4, seq_len=16, dtype="float32", lr=1e-2)
    config = model_config("llama-20m", rcp, **TINY)
    store = FamilyStore(tmp_path / name)
    params, result = pretrain(config, rcp, WindowBatches(periodic_windows()), periodic_windows(8, seed=0), store,
                              grad_accum=2, save_every=2, stop_after=stop_after)
    store.close()
    return config, params, result


def test_a_run_lowers_the_loss_keeps_the_sparse_support_and_resumes_bitwise(tmp_path):
    config, params, result = tiny_run(tmp_path, "sltrain")
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.tokens == 4 * 4 * 16 and result.eval_ppl == pytest.approx(np.exp(result.eval_nll))
    initial = init_params(config, seed=0)
    for layer in ("attn", "mlp"):
        for name in {"attn": "qkvo", "mlp": ("gate", "up", "down")}[layer]:
            start, end = initial["layers_0"][layer][name], params["layers_0"][layer][name]
            np.testing.assert_array_equal(start["indices"], end["indices"])
            assert not np.array_equal(start["values"], end["values"])
    # stopped after 2 steps, then resumed from the store: the same model as the uninterrupted run
    tiny_run(tmp_path, "sltrain", stop_after=2, name="pieces")
    _, resumed, resumed_result = tiny_run(tmp_path, "sltrain", name="pieces")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert [h["loss"] for h in resumed_result.history] == losses
    meta = FamilyStore(tmp_path / "pieces", read_only=True).members()
    assert meta[0]["name"] == "sltrain" and meta[0]["step"] == 4


def test_a_store_of_another_run_is_refused(tmp_path):
    from plrd_jax.io.store import StoreError

    tiny_run(tmp_path, "cola", steps=1)
    with pytest.raises(StoreError, match="another run"):
        tiny_run(tmp_path, "lowrank", steps=1)


class ByteTokenizer:
    eos_token_id = 0

    def encode(self, text):
        return [1 + b % 63 for b in text.encode()]


def test_streamed_batches_shuffle_within_chunks_and_resume_from_the_saved_position(tmp_path):
    docs = [f"document {i} " + "word " * (i % 11) for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stream = StreamedBatches(str(path), ByteTokenizer(), 8, seed=3, chunk_documents=4)
    straight = stream.batches(5)
    first = [next(straight) for _ in range(6)]
    resumed = stream.batches(5, start_step=3, state=first[2][1])
    for (batch, state), (want, want_state) in zip((next(resumed) for _ in range(3)), first[3:]):
        np.testing.assert_array_equal(batch, want)
        assert state == want_state
    # chunk 0's windows are exactly the packed windows of its 4 documents, permuted
    from plrd_jax.data.windows import stream_windows

    chunk0 = np.stack(list(stream_windows(docs[:4], ByteTokenizer(), 8)))
    seen = np.concatenate([b for b, _ in first])[: len(chunk0)]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, chunk0)) and not np.array_equal(seen, chunk0)


def test_cli_pretrain_reports_bad_input_in_one_line(tmp_path, capsys):
    from plrd_jax.cli import main

    assert main(["pretrain", "--method", "galore", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown method 'galore'; expected one of full, lowrank, cola, cola-m, sltrain"
    assert main(["pretrain", "--data", "wikitext2-eval", "--eval-data", "wikitext2-eval", "--out", str(tmp_path)]) == 2
    assert "disjoint" in capsys.readouterr().err
