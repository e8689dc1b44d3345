"""Zero-shot scoring: each request's log-likelihood equals a plain, unbatched forward pass summed in numpy;
tokenization follows lm-eval's rules; accuracies follow from the scores; task files fail with their line
number. The cross-check against lm-eval itself is experiments/zeroshot_vs_lmeval.py (its result is in
experiments/results/zeroshot_vs_lmeval.md)."""
import json

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from plrd_jax.nn.config import ModelConfig
from plrd_jax.io.tokenizer import Tokenizer
from plrd_jax.nn.model import Decoder, init_params
from plrd_jax.evaluation.tasks import (SUITES, TASKS, Example, Task, ZeroShotError, load_task, multiple_choice,
                                     read_jsonl, task_names)
from plrd_jax.evaluation.zeroshot import encode_pair, evaluate_task, loglikelihoods, score_task

CONFIG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     max_seq_len=64, tie_embeddings=True)


def char_tokenizer():
    """One token per character of a small alphabet (so token counts are easy to reason about)."""
    alphabet = " abcdefghijklmnopqrstuvwxyz?.:\n"
    backend = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(alphabet)} | {"<unk>": 38}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return Tokenizer(backend, bos_token_id=39, eos_token_id=39)


def reference_ll(params, context, continuation):
    """log p(continuation | context), one request, no padding, numpy sums."""
    tokens = np.array(context + continuation)
    logits = np.asarray(Decoder(CONFIG).apply({"params": params}, tokens[None, :-1]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    positions = np.arange(len(context) - 1, len(tokens) - 1)
    return logp[positions, tokens[positions + 1]].sum(), bool(np.all(logits[positions].argmax(-1) ==
                                                                      tokens[positions + 1]))


def test_batched_padded_scores_equal_one_plain_forward_per_request():
    params = init_params(CONFIG, seed=1)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 39, rng.integers(1, 30)).tolist(), rng.integers(0, 39, rng.integers(1, 9)).tolist())
                for _ in range(11)]
    ll, greedy = loglikelihoods(CONFIG, params, requests, batch_size=4)
    for (ctx, cont), value, g in zip(requests, ll, greedy):
        expected, expected_greedy = reference_ll(params, ctx, cont)
        np.testing.assert_allclose(value, expected, rtol=2e-5)
        assert g == expected_greedy


def test_truncation_keeps_the_last_max_length_tokens():
    params = init_params(CONFIG, seed=1)
    ctx, cont = list(range(1, 37)) * 2, [5, 6, 7]
    (ll,), _ = loglikelihoods(CONFIG, params, [(ctx, cont)], max_length=20)
    keep = (ctx + cont)[-21:]
    expected, _ = reference_ll(params, keep[:-3], keep[-3:])
    np.testing.assert_allclose(ll, expected, rtol=2e-5)


def test_pairs_are_tokenized_as_lm_eval_does():
    tok = char_tokenizer()
    # trailing spaces of the context move to the continuation
    assert encode_pair(tok, "ab: ", "cd") == (tok.encode("ab:"), tok.encode(" cd"))
    assert encode_pair(tok, "ab", " cd") == (tok.encode("ab"), tok.encode(" cd"))
    # an empty context is the BOS (else EOS) token
    assert encode_pair(tok, "", "xy") == ([39], tok.encode("xy"))
    assert encode_pair(tok, "ab", " c", add_bos=True) == ([39, *tok.encode("ab")], tok.encode(" c"))


def test_acc_and_acc_norm_follow_the_scores():
    task = Task("t", (multiple_choice("q", ["a", "bbbb"], 1), multiple_choice("q", ["aa", "b"], 0)), "mem")
    # example 1: raw argmax picks choice 0 (-4 > -6); per character 1 wins (-6/4 > -4/1)
    # example 2: raw argmax picks 1 (ties break to the first index only on equality); per char: -3/2 > -2/1
    result = score_task(task, [np.array([-4.0, -6.0]), np.array([-3.0, -2.0])])
    assert (result.acc, result.acc_norm) == (0.0, 1.0)
    assert score_task(Task("t", task.examples[:1], "mem"), [np.array([-5.0, -5.0])]).acc == 0.0  # tie -> first


def test_evaluate_task_end_to_end_on_a_jsonl_file(tmp_path):
    tok = char_tokenizer()
    params = init_params(CONFIG, seed=2)
    path = tmp_path / "t.jsonl"
    lines = [{"context": "is it blue?", "choices": ["yes", "no"], "gold": 0},
             {"contexts": ["the cat", "the dog"], "continuation": "sat.", "gold": 1}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = load_task(str(path))
    assert task.examples[1] == Example(("the cat", "the dog"), (" sat.", " sat."), ("the cat", "the dog"), 1)
    result = evaluate_task(CONFIG, params, tok, task, batch_size=3)
    expected = [[reference_ll(params, *encode_pair(tok, c, k))[0] for c, k in zip(ex.contexts, ex.continuations)]
                for ex in task.examples]
    np.testing.assert_allclose(result.lls, expected, rtol=2e-5)
    assert result.acc == np.mean([np.argmax(e) == ex.gold for e, ex in zip(expected, task.examples)])


@pytest.mark.parametrize("line, message", [
    ('{"context": "q", "choices": ["a", "b"], "gold": 0', "line 2: not valid JSON"),
    ('{"context": "q", "choices": ["a", "b"]}', "line 2: missing field 'gold'"),
    ('{"context": "q", "choices": ["a", "b"], "gold": 2}', "line 2: gold 2 is not an index into its 2 choices"),
    ('{"context": "q", "choices": "ab", "gold": 0}', "line 2: 'choices' must be a list of at least 2 strings"),
    ('{"choices": ["a", "b"], "gold": 0}', "line 2: missing string field 'context'"),
    ('[1, 2]', "line 2: expected a JSON object, got list"),
])
def test_malformed_lines_name_their_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "q", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(ZeroShotError, match=f"{path} {message}"):
        read_jsonl(path)


def test_named_tasks_apply_lm_evals_templates(tmp_path):
    docs = {
        "boolq": {"passage": "P", "question": "is it", "label": 1},
        "winogrande": {"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"},
        "logiqa": {"context": "C", "question": "Q", "options": ["o1", "o2", "o3", "o4"], "label": "c"},
        "mmlu": {"question": " Q ", "choices": ["w", "x", "y", "z"], "answer": 2, "subject": "abstract_algebra"},
        "hellaswag": {"activity_label": "Act", "ctx_a": "a.", "ctx_b": "then", "endings": ["e [title] f", "g"],
                      "label": "0"},
    }
    for name, doc in docs.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(doc) + "\n")
    ex = {name: load_task(name, tmp_path).examples[0] for name in docs}
    assert ex["boolq"] == multiple_choice("P\nQuestion: is it?\nAnswer:", ["no", "yes"], 1)
    assert ex["winogrande"] == Example(("A x", "A y"), (" b.", " b."), ("A x", "A y"), 1)
    assert ex["logiqa"].contexts[0] == "Passage: C\nQuestion: Q\nChoices:\nA. o1\nB. o2\nC. o3\nD. o4\nAnswer:"
    assert ex["logiqa"].gold == 2
    assert ex["mmlu"].contexts[0] == ("The following are multiple choice questions (with answers) about abstract "
                                      "algebra.\n\nQ\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert ex["mmlu"].continuations == (" A", " B", " C", " D")
    assert ex["hellaswag"].contexts[0] == "Act: a. Then" and ex["hellaswag"].choices == ("e. f", "g")
    (tmp_path / "boolq.jsonl").write_text('{"passage": "P", "label": 1}\n')
    with pytest.raises(ZeroShotError, match="boolq.jsonl line 1: missing field 'question'"):
        load_task("boolq", tmp_path)


def test_suites_and_unknown_tasks(tmp_path):
    assert task_names(["plrd"]) == ["logiqa", "boolq", "mmlu", "winogrande"]
    assert task_names(["boolq", "sheared"])[:3] == ["boolq", "sciq", "piqa"]
    assert all(name in TASKS for suite in SUITES.values() for name in suite)
    with pytest.raises(ZeroShotError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(ZeroShotError, match="task logiqa is not in TFDS: put its test docs"):
        load_task("logiqa", tmp_path)
    with pytest.raises(ZeroShotError, match="task file .*missing.jsonl does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))
