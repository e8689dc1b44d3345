import math

import numpy as np
import pytest

from plrd_jax import Decoder, ModelConfig, init_params
from plrd_jax.evaluation.perplexity import perplexity, window_nll_sums

CONFIG = ModelConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, max_seq_len=16, tie_embeddings=False)


def random_model():
    params = init_params(CONFIG, seed=0)
    # Larger logits than at init, so the scored distribution is far from uniform.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
    return params


def numpy_mean_nll(logits, windows):
    """Mean over windows and t = 1..T-1 of -log softmax(logits[n, t-1])[x[n, t]], in float64."""
    z = np.asarray(logits, np.float64)[:, :-1]
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]
    return -picked.mean()


def test_mean_nll_matches_numpy_reference_with_a_padded_last_batch():
    params = random_model()
    windows = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(7, 12)).astype(np.int32)
    logits = Decoder(CONFIG).apply({"params": params}, windows)
    want = numpy_mean_nll(logits, windows)
    assert abs(want - math.log(CONFIG.vocab_size)) > 0.5
    seen = []
    for batch_size in (3, 16):
        got = perplexity(CONFIG, params, windows, batch_size=batch_size, progress=lambda *a: seen.append(a))
        assert got.nll == pytest.approx(want, rel=1e-5)
        assert got.ppl == pytest.approx(math.exp(got.nll), rel=1e-12)
        assert (got.seq_len, got.windows, got.tokens) == (12, 7, 7 * 11)
    assert seen[:3] == [(3, 7), (6, 7), (7, 7)]


def test_max_tokens_scores_the_first_windows():
    params = random_model()
    windows = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(6, 8)).astype(np.int32)
    got = perplexity(CONFIG, params, windows, batch_size=4, max_tokens=17)  # ceil(17 / 8) = 3 windows
    want = numpy_mean_nll(Decoder(CONFIG).apply({"params": params}, windows[:3]), windows[:3])
    assert (got.windows, got.tokens) == (3, 3 * 7)
    assert got.nll == pytest.approx(want, rel=1e-5)


def test_apply_fn_against_closed_form_and_one_compile_per_batch_shape():
    # A bigram model: logits at position t are table[x_t], so NLL is a table lookup.
    table = np.random.default_rng(2).normal(size=(11, 11)).astype(np.float32)
    apply_fn = lambda params, tokens: params[tokens]
    windows = np.random.default_rng(3).integers(0, 11, size=(5, 6)).astype(np.int32)
    log_probs = table - np.log(np.exp(table.astype(np.float64)).sum(-1, keepdims=True))
    want = -np.mean(log_probs[windows[:, :-1], windows[:, 1:]])
    before = window_nll_sums._cache_size()
    got = perplexity(apply_fn, table, windows, batch_size=2)
    perplexity(apply_fn, table, windows[:3], batch_size=2)
    assert window_nll_sums._cache_size() == before + 1
    assert got.nll == pytest.approx(want, rel=1e-6)


def test_window_longer_than_the_model_is_refused():
    with pytest.raises(ValueError, match="window length 32 exceeds the model's max_seq_len 16"):
        perplexity(CONFIG, None, np.zeros((2, 32), np.int32))


@pytest.mark.slow
def test_parent_wikitext2_perplexity_equals_hf_torch_on_the_same_windows():
    import os

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.io.load import embedded_path, load_model

    config, params, tokenizer = load_model("smollm2-135m")
    windows = load_dataset("wikitext2-test", tokenizer, 512, max_windows=8).windows
    ours = perplexity(config, params, windows, batch_size=4)

    path = embedded_path("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for row in torch.from_numpy(windows.astype(np.int64)):
            logp = torch.log_softmax(hf(row[None]).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(-1, row[1:, None]).sum().item()
            count += row.numel() - 1
    theirs = float(np.exp(nll / count))
    assert ours.tokens == count == 8 * 511
    assert abs(ours.ppl - theirs) / theirs <= 1e-3, (ours.ppl, theirs)
    assert abs(ours.ppl - 30.148) / 30.148 <= 1e-3  # the reference figure measured with HF alone


def test_geometric_mean_of_ratios_and_the_eval_command_on_several_corpora(tmp_path, capsys):
    """geomean_ratio is the closed form (Π r_i)^(1/n); `eval --data A,B` prints one line per corpus whose PPL
    equals `perplexity` on that corpus's windows."""
    import json

    from plrd_jax.cli import main
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.evaluation.perplexity import geomean_ratio, ratios_to_parent
    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model
    from test_hf import small_tokenizer

    assert ratios_to_parent({"a": 4.0, "b": 9.0}, {"a": 2.0, "b": 1.0}) == {"a": 2.0, "b": 9.0}
    np.testing.assert_allclose(geomean_ratio({"a": 4.0, "b": 9.0}, {"a": 2.0, "b": 1.0}), math.sqrt(18.0))
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, max_seq_len=64)
    save_hf(init_params(config, seed=0), config, tmp_path / "m", tokenizer=small_tokenizer(full_byte_alphabet=True))
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 30)
    (tmp_path / "b.txt").write_text("def f(x): return x\n" * 30)
    names = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", ",".join(names), "--seq-len", "32",
                 "--max-tokens", "64", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["data"]["source"] for r in records] == names
    config, params, tokenizer = load_model(str(tmp_path / "m"))
    for name, record in zip(names, records):
        windows = load_dataset(name, tokenizer, 32, max_windows=2).windows
        np.testing.assert_allclose(record["ppl"], perplexity(config, params, windows).ppl, rtol=1e-6)
