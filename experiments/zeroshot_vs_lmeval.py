"""Our zero-shot scores against lm-evaluation-harness on the same model and tasks, example by example.

    python experiments/zeroshot_vs_lmeval.py --lm-eval-python /path/to/venv-with-lm-eval/bin/python

Model: the embedded parent (SmolLM2-135M) and a member of it: a stored one (`--member FAMILY_DIR:N`), else
every attention and MLP matrix factorized at 40% of its full rank, no healing. We score the member on its factors; lm-eval scores the dense Hugging Face
export (`save_hf`) with its `hf` backend (torch, float32, CPU), offline, through two local tasks:

  cloze     40 four-way cloze questions from WikiText-2 (context: a sentence's first words; choices: its next
            words and the next words of three other sentences)        — one context, four continuations
  partial   the same sentences as two contexts (the true one and one with its last context word swapped)
            before a shared continuation                               — lm-eval's WinoGrande mode

Both tasks are written as JSONL (ours) and as lm-eval task YAMLs over the same file. Results:
experiments/results/zeroshot_vs_lmeval.{md,json}: per-choice log-likelihood differences and both tools' acc
and acc_norm.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
{body}
metric_list:
  - metric: acc
  - metric: acc_norm
"""
CLOZE_BODY = """doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
"""
PARTIAL_BODY = """doc_to_text: !function utils.partial_gold
doc_to_choice: !function utils.partial_contexts
doc_to_target: !function utils.partial_continuation
"""
UTILS = """def partial_gold(doc):
    return doc["gold"]


def partial_contexts(doc):
    return doc["contexts"]


def partial_continuation(doc):
    return doc["continuation"]
"""


def make_tasks(out: Path, n: int = 40, seed: int = 0) -> dict[str, Path]:
    """Cloze and partial-context tasks from WikiText-2 test sentences (deterministic)."""
    from plrd_jax.data.corpora import load_text

    text = load_text("wikitext2-test")
    sentences = [s.strip() + "." for s in text.replace("\n", " ").split(" . ")]
    sentences = [s for s in sentences if 14 <= len(s.split()) <= 40 and "@" not in s and "=" not in s]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(sentences), size=4 * n, replace=False)
    cloze, partial = [], []
    for k in range(n):
        words = [sentences[i].split() for i in picked[4 * k: 4 * k + 4]]
        cut = [len(w) // 2 for w in words]
        endings = [" ".join(w[c:c + 4]) for w, c in zip(words, cut)]
        gold = int(rng.integers(4))
        order = [1, 2, 3]
        choices = [endings[j] for j in order]
        choices.insert(gold, endings[0])
        context = " ".join(words[0][:cut[0]])
        cloze.append({"context": context, "choices": choices, "gold": gold})
        swapped = " ".join(words[0][:cut[0] - 1] + [words[1][cut[1] - 1]])
        contexts = [context, swapped] if k % 2 == 0 else [swapped, context]
        partial.append({"contexts": contexts, "continuation": endings[0], "gold": 0 if k % 2 == 0 else 1})
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs, body in (("plrd_cloze", cloze, CLOZE_BODY), ("plrd_partial", partial, PARTIAL_BODY)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(d) + "\n" for d in docs))
        (out / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=paths[name], body=body))
    (out / "utils.py").write_text(UTILS)
    return paths


def member(config, params):
    """Every attention and MLP matrix at 40% of its full rank (all below break-even, so all factorized)."""
    from plrd_jax.transforms.factorize import factorize
    from plrd_jax.transforms.plan import RankPlan

    return factorize(params, RankPlan(("attn", "mlp"), fraction=0.4), config)


def ours(model_config, params, tokenizer, tasks: dict[str, Path]) -> dict:
    from plrd_jax.evaluation.tasks import load_task
    from plrd_jax.evaluation.zeroshot import evaluate_task

    out = {}
    for name, path in tasks.items():
        t0 = time.perf_counter()
        result = evaluate_task(model_config, params, tokenizer, load_task(str(path)), batch_size=16)
        out[name] = {**result.summary(), "lls": result.lls, "seconds": time.perf_counter() - t0}
    return out


def lm_eval(python: str, model_dir: Path, task_dir: Path, out: Path) -> dict:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [python, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32,add_bos_token=False",
           "--tasks", "plrd_cloze,plrd_partial", "--include_path", str(task_dir), "--device", "cpu",
           "--batch_size", "8", "--log_samples", "--output_path", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    seconds = time.perf_counter() - t0
    results = {}
    for name in ("plrd_cloze", "plrd_partial"):
        [samples] = glob.glob(str(out / "**" / f"samples_{name}_*.jsonl"), recursive=True)
        rows = sorted((json.loads(line) for line in open(samples)), key=lambda r: r["doc_id"])
        lls = [[float(resp[0][0]) for resp in r["resps"]] for r in rows]
        results[name] = {"acc": float(np.mean([r["acc"] for r in rows])),
                         "acc_norm": float(np.mean([r["acc_norm"] for r in rows])), "lls": lls,
                         "command": " ".join(cmd), "seconds": seconds}
    return results


def compare(a: dict, b: dict) -> dict:
    out = {}
    for name in a:
        x, y = np.array(a[name]["lls"]), np.array(b[name]["lls"])
        diff = np.abs(x - y)
        out[name] = {"examples": len(x), "choices": int(x.size), "max_abs_ll_diff": float(diff.max()),
                     "max_rel_ll_diff": float((diff / np.abs(y)).max()),
                     "same_predictions": bool((x.argmax(1) == y.argmax(1)).all()),
                     "ours": {k: a[name][k] for k in ("acc", "acc_norm")},
                     "lm_eval": {k: b[name][k] for k in ("acc", "acc_norm")}}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-eval-python", help="a Python whose environment has lm-eval installed")
    p.add_argument("--make-tasks", metavar="DIR", help="only write the two tasks (JSONL + lm-eval YAML) into DIR")
    p.add_argument("--member", default=None, help="a stored member FAMILY_DIR:N (default: the parent factorized at "
                                                  "rank fraction 0.4, unhealed)")
    p.add_argument("--work", default="/tmp/plrd-zeroshot")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "zeroshot_vs_lmeval"))
    args = p.parse_args(argv)
    if args.make_tasks:
        make_tasks(Path(args.make_tasks))
        return
    if not args.lm_eval_python:
        p.error("--lm-eval-python is required (or --make-tasks DIR)")
    from plrd_jax.io.hf import save_hf
    from plrd_jax.io.load import load_model
    from plrd_jax.nn.accounting import count_params

    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    tasks = make_tasks(work / "tasks")
    config, params, tokenizer = load_model("smollm2-135m")
    if args.member:  # a stored (healed) member
        member_config, member_params, _ = load_model(args.member)
        models = {"parent": (config, params), f"member {args.member}": (member_config, member_params)}
    else:
        models = {"parent": (config, params), "member (rank fraction 0.4, unhealed)": member(config, params)[::-1]}
    report = {}
    for label, (model_config, model_params) in models.items():
        assert label == "parent" or model_config.linears, "the member must hold factorized matrices"
        model_dir = work / label.split()[0]
        save_hf(model_params, model_config, model_dir, tokenizer=tokenizer)
        a = ours(model_config, model_params, tokenizer, tasks)
        b = lm_eval(args.lm_eval_python, model_dir, work / "tasks", work / f"lm_eval_{label.split()[0]}")
        report[label] = {"params": count_params(model_params), "comparison": compare(a, b), "ours_seconds": {k: v["seconds"] for k, v in a.items()},
                         "lm_eval_seconds": next(iter(b.values()))["seconds"],
                         "lm_eval_command": next(iter(b.values()))["command"], "ours": a, "lm_eval": b}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    lines = ["Zero-shot scores: plrd_jax (`plrd_jax.evaluation.zeroshot`, JAX, float32, on the member's factors) against "
             "lm-evaluation-harness (`hf` backend, torch float32, on the dense export), same tasks, offline.", "",
             "| model | params | task | examples × choices | max abs Δ log-lik | max rel Δ | same predictions | "
             "acc ours / lm-eval | acc_norm ours / lm-eval |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in report.items():
        for name, c in r["comparison"].items():
            lines.append(f"| {label} | {r['params']:,} | {name} | {c['examples']} × {c['choices'] // c['examples']} | "
                         f"{c['max_abs_ll_diff']:.2e} | {c['max_rel_ll_diff']:.1e} | {c['same_predictions']} | "
                         f"{c['ours']['acc']:.3f} / {c['lm_eval']['acc']:.3f} | "
                         f"{c['ours']['acc_norm']:.3f} / {c['lm_eval']['acc_norm']:.3f} |")
    lines += ["", f"lm-eval command: `{next(iter(report.values()))['lm_eval_command']}`", ""]
    Path(args.out + ".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
