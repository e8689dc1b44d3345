"""The lm-evaluation-harness model (`lm_eval --model plrd_jax`): found through lm-eval's registry (our
`lm_eval.models` entry point, or the import that registers it); its three request types checked against direct
computations on a tiny factorized member; end to end through `simple_evaluate` on local task files (lm-eval YAML
over local JSONL); and, slow, on a healed member of the main job's family: the same accuracies as lm-eval's own
`hf` model on the member's dense HF export and as our `zeroshot` command. Skipped without lm-eval (`.[eval]`)."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from plrd_jax.evaluation.generate import generate  # noqa: E402
from plrd_jax.evaluation.perplexity import perplexity  # noqa: E402
from plrd_jax.nn.model import Decoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILY = ROOT / "runs" / "smollm2-family"
TEXT = "the cat sat on the mat while the dog slept by the door. " * 40 + "def f(x):\n    return x * 2\n" * 20
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def tiny_tokenizer():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    from plrd_jax.io.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT] * 5, trainer)
    return Tokenizer(backend, bos_token_id=1, eos_token_id=0)


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """"FAMILY_DIR:0" of a tmp FamilyStore: a random tiny model with every attention and MLP matrix factorized
    at 40 % of its rank, its tokenizer beside it."""
    from plrd_jax.io.store import FamilyStore
    from plrd_jax.nn.config import ModelConfig
    from plrd_jax.nn.model import init_params
    from plrd_jax.transforms.factorize import factorize
    from plrd_jax.transforms.plan import RankPlan

    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=64, bos_token_id=1, eos_token_id=0)
    params, config = factorize(init_params(config, seed=0), RankPlan(("attn", "mlp"), fraction=0.4), config)
    assert config.linears, "the tiny member must hold factorized matrices"
    fam = tmp_path_factory.mktemp("lm_eval") / "fam"
    store = FamilyStore(fam)
    store.save(0, params, {"member": 0, "name": "tiny-40%", "method": "test", "step": 0, "final": True,
                           "config": config.to_dict()})
    store.close()
    tiny_tokenizer().save(fam / "tokenizer")
    return f"{fam}:0"


@pytest.fixture(scope="module")
def lm(member):
    from plrd_jax.evaluation.lm_eval_model import PlrdJaxLM

    return PlrdJaxLM(model=member, batch_size=4)


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


# ---- registration ---------------------------------------------------------------------------------------------
def test_the_entry_point_resolves_through_lm_evals_registry():
    """Our distribution declares `plrd_jax` in lm-eval's plugin group; registered as lm-eval registers an entry
    point (a lazy placeholder), the name resolves to our class. Importing the module registers it for released
    lm-eval, next to the built-in models."""
    from lm_eval.api.registry import Registry, get_model

    [ep] = [ep for ep in importlib.metadata.entry_points(group="lm_eval.models") if ep.name == "plrd_jax"]
    assert ep.value == "plrd_jax.evaluation.lm_eval_model:PlrdJaxLM" and ep.dist.name == "plrd_jax"
    registry = Registry("model")
    registry.register(ep.name, target=ep)
    from plrd_jax.evaluation.lm_eval_model import PlrdJaxLM

    assert registry.get("plrd_jax") is PlrdJaxLM
    assert get_model("plrd_jax") is PlrdJaxLM and get_model("hf").__name__ == "HFLM"


def test_the_rest_of_the_package_never_imports_lm_eval():
    code = ("import sys, plrd_jax, plrd_jax.cli, plrd_jax.evaluation.zeroshot, plrd_jax.evaluation.tasks; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   timeout=300)


# ---- the three request types ------------------------------------------------------------------------------------
def test_loglikelihood_is_the_summed_log_probs_of_the_continuation(lm, member):
    """Against one plain forward pass per request, log-softmax in float64 numpy; tokenized independently with
    lm-eval's rules (trailing context spaces move to the continuation; an empty context is BOS)."""
    tok = lm.tokenizer
    pairs = [("the cat sat on", " the mat"), ("the dog ", "slept by the door."), ("", "the cat"),
             ("def f(x):\n", "    return x * 2"), ("the cat sat on the mat while the dog", " slept")]
    results = lm.loglikelihood(requests("loglikelihood", pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, results):
        if ctx:
            stripped = ctx.rstrip()
            ctx_ids = tok.encode(stripped)
            cont_ids = tok.encode(ctx + cont)[len(ctx_ids):]
        else:
            ctx_ids, cont_ids = [1], tok.encode(cont)
        tokens = np.array(ctx_ids + cont_ids)
        logits = np.asarray(Decoder(lm.config).apply({"params": lm.params}, tokens[None, :-1]))[0]
        rows = np.arange(len(ctx_ids) - 1, len(tokens) - 1)
        expected = log_softmax(logits)[rows, tokens[rows + 1]].sum()
        np.testing.assert_allclose(ll, expected, rtol=2e-5)
        assert greedy == bool(np.all(logits[rows].argmax(-1) == tokens[rows + 1]))


def test_loglikelihood_rolling_is_perplexitys_nll_sum(member):
    """A text of 3·L tokens in windows of L = max_length: lm-eval's rolling windows are [prefix, x_0..x_{L-1}],
    [x_{L-1}..x_{2L-1}], ..., exactly perplexity's windows [3, L + 1] over prefix + text; so the rolling
    log-likelihood is −NLL · tokens. A text shorter than one window scores as loglikelihood('', text)."""
    from plrd_jax.evaluation.lm_eval_model import PlrdJaxLM

    L = 16
    lm = PlrdJaxLM(model=member, batch_size=2, max_length=L)
    text = next(TEXT[:n] for n in range(len(TEXT)) if len(lm.tokenizer.encode(TEXT[:n])) == 3 * L)
    tokens = [lm.prefix_token_id] + lm.tokenizer.encode(text)
    windows = np.array([tokens[j * L: j * L + L + 1] for j in range(3)])
    reference = perplexity(lm.config, lm.params, windows)
    short = "the cat sat on the mat"
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    np.testing.assert_allclose(rolling[0], -reference.nll * reference.tokens, rtol=2e-5)
    [(ll, _)] = lm.loglikelihood(requests("loglikelihood", [("", short)]))
    np.testing.assert_allclose(rolling[1], ll, rtol=2e-5)


def test_batched_generation_equals_one_prompt_at_a_time(lm):
    """Prompts of different lengths decoded together (prefill of the shortest, teacher forcing the rest) give
    exactly the greedy tokens `generate` gives each prompt alone."""
    from plrd_jax.evaluation.lm_eval_model import generate_batch, prefill_length

    assert [prefill_length(n) for n in (5, 16, 17, 33, 100, 1000)] == [5, 16, 16, 32, 96, 960]
    prompts = [lm.tokenizer.encode(TEXT[:n]) for n in (70, 12, 40, 130)]
    assert len({len(p) for p in prompts}) == 4
    batched = generate_batch(lm.config, lm.params, prompts, 9)
    alone = [list(generate(lm.config, lm.params, p, 9)) for p in prompts]
    assert batched == alone


def test_generate_until_stops_at_the_stop_string(lm, monkeypatch):
    """Greedy text without a stop string, then with a stop string taken from its middle: the second is the first
    cut before that string, and decoding stopped there (fewer new tokens than max_gen_toks)."""
    from plrd_jax.evaluation import lm_eval_model

    prompts = ["the cat sat on the", "def f(x):"]
    free = lm.generate_until(requests("generate_until", [(p, {"until": [], "max_gen_toks": 24}) for p in prompts]))
    assert all(len(t) > 8 for t in free)
    stops = [t[4:7] for t in free]
    new_tokens, real = [], lm_eval_model.generate_batch
    monkeypatch.setattr(lm_eval_model, "generate_batch",
                        lambda *a, **k: new_tokens.extend(map(len, out := real(*a, **k))) or out)
    cut = lm.generate_until(requests("generate_until", [(p, {"until": [s], "max_gen_toks": 24})
                                                        for p, s in zip(prompts, stops)]))
    assert cut == [t.split(s)[0] for t, s in zip(free, stops)]
    assert new_tokens and max(new_tokens) < 24


# ---- end to end through lm-eval, on local task files ------------------------------------------------------------
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: {output_type}
{body}"""
CHOICE_BODY = """doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PARTIAL_BODY = """doc_to_text: !function utils.gold
doc_to_choice: !function utils.contexts
doc_to_target: !function utils.continuation
metric_list:
  - metric: acc
"""
ROLLING_BODY = """doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""
GENERATE_BODY = """doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["{until}"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
"""
UTILS = """def gold(doc):
    return doc["gold"]


def contexts(doc):
    return doc["contexts"]


def continuation(doc):
    return doc["continuation"]
"""


def write_task(directory: Path, name: str, docs: list[dict], output_type: str, body: str) -> Path:
    """NAME.jsonl and NAME.yaml (lm-eval's task format over that local file); utils.py beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, output_type=output_type,
                                                            body=body))
    (directory / "utils.py").write_text(UTILS)
    return data


def evaluate(model: str, model_args: str, task_dir: Path, tasks: list[str], batch_size: int = 8) -> dict:
    """lm_eval.simple_evaluate on the tasks of task_dir only; {task: {"metrics", "resps" (by doc_id)}}."""
    from lm_eval.tasks import TaskManager

    import plrd_jax.evaluation.lm_eval_model  # noqa: F401  registers plrd_jax (released lm-eval reads no entry points)

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=batch_size,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0, device="cpu")
    return {t: {"metrics": out["results"][t],
                "resps": [s["resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]} for t in tasks}


def test_simple_evaluate_runs_all_three_request_types(member, lm, tmp_path, monkeypatch):
    """`simple_evaluate(model="plrd_jax")` through the registry on local multiple-choice, rolling and generation
    tasks: each response is what the model gives for that request directly."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    write_task(tmp_path, "tiny_choice", [{"context": "the cat sat on the", "choices": ["mat", "door", "dog"],
                                          "gold": 0}, {"context": "def f(x):", "choices": ["return", "the"],
                                                       "gold": 0}], "multiple_choice", CHOICE_BODY)
    write_task(tmp_path, "tiny_rolling", [{"text": TEXT[:300]}, {"text": "the dog slept by the door."}],
               "loglikelihood_rolling", ROLLING_BODY)
    write_task(tmp_path, "tiny_generate", [{"prompt": "the cat sat", "answer": " on the mat"}],
               "generate_until", GENERATE_BODY.format(until=".", max_gen_toks=10))
    tasks = ["tiny_choice", "tiny_rolling", "tiny_generate"]
    got = evaluate("plrd_jax", f"model={member},max_length=32", tmp_path, tasks, batch_size=4)
    direct = lm.loglikelihood(requests("loglikelihood", [("the cat sat on the", " mat"), ("def f(x):", " the")]))
    assert got["tiny_choice"]["resps"][0][0][0][0] == pytest.approx(direct[0][0], rel=1e-6)
    assert got["tiny_choice"]["resps"][1][1][0][0] == pytest.approx(direct[1][0], rel=1e-6)
    from plrd_jax.evaluation.lm_eval_model import PlrdJaxLM

    short = PlrdJaxLM(model=member, max_length=32)
    rolling = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXT[:300],)]))
    assert got["tiny_rolling"]["resps"][0][0][0] == pytest.approx(rolling[0], rel=1e-6)
    text = short.generate_until(requests("generate_until", [("the cat sat", {"until": ["."], "max_gen_toks": 10})]))
    assert got["tiny_generate"]["resps"][0][0][0] == text[0]


# ---- slow: a healed member of the main job's family, against lm-eval's hf model and our zeroshot command ------
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
            ("Egypt", "Cairo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
            ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
            ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
            ("the Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "New Delhi"),
            ("Thailand", "Bangkok"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("Iran", "Tehran")]


def capital_tasks(directory: Path) -> dict[str, Path]:
    """32 four-way cloze questions (one context, four continuations) and the same 32 as two contexts before a
    shared continuation (WinoGrande's form); a rolling and a generation task over the same facts."""
    rng = np.random.default_rng(0)
    cloze, partial = [], []
    for k, (country, capital) in enumerate(CAPITALS):
        choices = [str(c) for c in rng.choice([c for _, c in CAPITALS if c != capital], 3, replace=False)]
        gold = int(rng.integers(4))
        choices.insert(gold, capital)
        cloze.append({"context": f"The capital of {country} is", "choices": choices, "gold": gold})
        other = CAPITALS[(k + 1 + int(rng.integers(len(CAPITALS) - 1))) % len(CAPITALS)][0]
        contexts = [f"The capital city of {country}", f"The capital city of {other}"][::1 - 2 * (k % 2)]
        partial.append({"contexts": contexts, "continuation": f"is {capital}.", "gold": k % 2})
    facts = [" ".join(f"{cap} is the capital of {c}." for c, cap in CAPITALS[i:i + 8]) for i in range(0, 32, 8)]
    return {"capitals_cloze": write_task(directory, "capitals_cloze", cloze, "multiple_choice",
                                         CHOICE_BODY),
            "capitals_partial": write_task(directory, "capitals_partial", partial, "multiple_choice",
                                           PARTIAL_BODY + "  - metric: acc_norm\n"),
            "capitals_rolling": write_task(directory, "capitals_rolling", [{"text": f} for f in facts],
                                           "loglikelihood_rolling", ROLLING_BODY),
            "capitals_generate": write_task(directory, "capitals_generate",
                                            [{"prompt": f"The capital of {c} is", "answer": f" {cap}"}
                                             for c, cap in CAPITALS[:12]], "generate_until",
                                            GENERATE_BODY.format(until=".", max_gen_toks=12))}


@pytest.mark.slow
@pytest.mark.skipif(not (FAMILY / "tokenizer").is_dir(), reason="needs the main job's family at runs/smollm2-family")
def test_a_healed_member_scores_as_lm_evals_hf_model_and_our_zeroshot_command(tmp_path, monkeypatch):
    from plrd_jax import cli
    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    spec = f"{FAMILY}:0"
    config, params, tokenizer = load_model(spec)
    parent = count_params(load_model("smollm2-135m")[1])
    assert config.linears and abs(count_params(params) / parent - 0.90) < 0.005, "member 0 is the 90 % member"
    save_hf(params, config, tmp_path / "hf", tokenizer=tokenizer)  # dense: the factors multiplied out
    del params
    paths = capital_tasks(tmp_path / "tasks")
    tasks = list(paths)
    ours = evaluate("plrd_jax", f"model={spec}", tmp_path / "tasks", tasks)
    hf = evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32,add_bos_token=False", tmp_path / "tasks", tasks)
    assert cli.main(["zeroshot", "--model", spec, "--task", str(paths["capitals_cloze"]), "--task",
                     str(paths["capitals_partial"]), "--out", str(tmp_path / "zeroshot.json")]) == 0
    zeroshot = json.loads((tmp_path / "zeroshot.json").read_text())["tasks"]
    for name in ("capitals_cloze", "capitals_partial"):
        a, b, z = ours[name], hf[name], zeroshot[name]
        for metric in ("acc", "acc_norm"):
            assert a["metrics"][f"{metric},none"] == b["metrics"][f"{metric},none"] == z[metric], (name, metric)
        ll = [[choice[0][0] for choice in doc] for doc in a["resps"]]
        np.testing.assert_allclose(ll, z["lls"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ll, [[choice[0][0] for choice in doc] for doc in b["resps"]], atol=2e-3)
    np.testing.assert_allclose([d[0][0] for d in ours["capitals_rolling"]["resps"]],
                               [d[0][0] for d in hf["capitals_rolling"]["resps"]], rtol=1e-5)
    assert [d[0][0] for d in ours["capitals_generate"]["resps"]] == [d[0][0] for d in hf["capitals_generate"]["resps"]]
    # the member knows capitals (chance: 0.25 and 0.5), so the equal accuracies compare real predictions
    assert ours["capitals_cloze"]["metrics"]["acc,none"] > 0.4 and ours["capitals_partial"]["metrics"]["acc,none"] > 0.8
