"""Zero-shot tasks: examples as (context, choices, gold), lm-eval's prompt templates for the named tasks
(applied to the raw fields of each dataset), and loading from JSONL files or TFDS.

Tasks: a JSONL file of examples ({"context", "choices", "gold"} or, for partial-context tasks like WinoGrande,
{"contexts", "continuation", "gold"}); a named task (`TASKS`) read from `DATA_DIR/NAME.jsonl` in the raw
fields of its dataset, or from TFDS where it exists there. `SUITES` names the PLRD paper's set and
Sheared-LLaMA's (its zero-shot multiple-choice part).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
from etils import epath



class ZeroShotError(ValueError):
    """A task file, task name or example that cannot be evaluated."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: choice i is scored as log p(continuations[i] | contexts[i]); `choices` are the texts
    whose character lengths normalize acc_norm (lm-eval's doc_to_choice)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


def multiple_choice(context: str, choices, gold: int, delimiter: str = " ") -> Example:
    """The usual form: one context, each choice as continuation (after `delimiter`, lm-eval's target_delimiter)."""
    choices = tuple(choices)
    return Example((context,) * len(choices), tuple(delimiter + c for c in choices), choices, int(gold))


def partial_contexts(contexts, continuation: str, gold: int, delimiter: str = " ") -> Example:
    """WinoGrande's form: a different context per choice, one shared continuation."""
    contexts = tuple(contexts)
    return Example(contexts, (delimiter + continuation,) * len(contexts), contexts, int(gold))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    examples: tuple[Example, ...]
    source: str  # where the examples came from


# ---- lm-eval's prompt templates for the named tasks (doc: the dataset's raw fields) -------------------------
def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _boolq(d):
    return multiple_choice(f"{_text(d['passage'])}\nQuestion: {_text(d['question'])}?\nAnswer:", ["no", "yes"],
                           int(d["label"]))


def _winogrande(d):
    sentence = _text(d["sentence"])
    if "_" not in sentence:
        raise ZeroShotError("a WinoGrande sentence needs a '_' blank")
    i = sentence.index("_")
    gold = int(_text(d["answer"])) - 1 if "answer" in d else int(d["label"])
    return partial_contexts([sentence[:i] + _text(d["option1"]), sentence[:i] + _text(d["option2"])],
                            sentence[i + 1:].strip(), gold)


def _hellaswag(d):
    ctx = _text(d["ctx_a"]) + " " + _text(d["ctx_b"]).capitalize() if "ctx_a" in d else _text(d["context"])
    return multiple_choice(_hellaswag_clean(_text(d["activity_label"]) + ": " + ctx),
                           [_hellaswag_clean(_text(e)) for e in d["endings"]], int(d["label"]))


def _piqa(d):
    return multiple_choice(f"Question: {_text(d['goal'])}\nAnswer:", [_text(d["sol1"]), _text(d["sol2"])],
                           int(d["label"]))


def _arc(d):
    choices = d["choices"]
    labels = [_text(x) for x in choices["label"]]
    return multiple_choice(f"Question: {_text(d['question'])}\nAnswer:", [_text(t) for t in choices["text"]],
                           labels.index(_text(d["answerKey"])))


def _sciq(d):
    return multiple_choice(f"{_text(d['support']).lstrip()}\nQuestion: {_text(d['question'])}\nAnswer:",
                           [_text(d[k]) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")], 3)


def _logiqa(d):
    options = [_text(o) for o in d["options"]]
    prompt = f"Passage: {_text(d['context'])}\nQuestion: {_text(d['question'])}\nChoices:\n"
    prompt += "".join(f"{letter}. {option}\n" for letter, option in zip("ABCD", options)) + "Answer:"
    label = d["label"]
    gold = "abcd".index(_text(label).strip()) if isinstance(label, (str, bytes)) else int(label)
    return multiple_choice(prompt, options, gold)


def _mmlu(d):
    choices = [_text(c) for c in d["choices"]]
    subject = _text(d.get("subject", "")).replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    body = f"{_text(d['question']).strip()}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", choices))
    return multiple_choice(head + body + "Answer:", ["A", "B", "C", "D"], int(d["answer"]))


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    convert: Callable[[Mapping], Example]
    tfds: str | None  # TFDS builder, when the dataset is in the TFDS catalog
    split: str  # the split lm-eval evaluates
    fields: tuple[str, ...]  # raw fields a JSONL doc needs


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(_boolq, "super_glue/boolq", "validation", ("passage", "question", "label")),
    "winogrande": TaskSpec(_winogrande, "winogrande", "validation", ("sentence", "option1", "option2")),
    "hellaswag": TaskSpec(_hellaswag, "hellaswag", "validation", ("activity_label", "endings", "label")),
    "piqa": TaskSpec(_piqa, "piqa", "validation", ("goal", "sol1", "sol2", "label")),
    "arc_easy": TaskSpec(_arc, "ai2_arc/ARC-Easy", "test", ("question", "choices", "answerKey")),
    "arc_challenge": TaskSpec(_arc, "ai2_arc/ARC-Challenge", "test", ("question", "choices", "answerKey")),
    "sciq": TaskSpec(_sciq, "sciq", "test", ("support", "question", "distractor1", "distractor2",
                                            "distractor3", "correct_answer")),
    "logiqa": TaskSpec(_logiqa, None, "test", ("context", "question", "options", "label")),
    "mmlu": TaskSpec(_mmlu, None, "test", ("question", "choices", "answer")),
}
# The PLRD paper's zero-shot set, and the multiple-choice part of Sheared-LLaMA's eleven tasks (LAMBADA and
# Natural Questions are not multiple choice; the paper runs ARC-C 25-shot, HellaSwag 10-shot, BoolQ 32-shot
# and MMLU 5-shot, here all are zero-shot).
SUITES = {
    "plrd": ("logiqa", "boolq", "mmlu", "winogrande"),
    "sheared": ("sciq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "logiqa", "boolq", "mmlu"),
}


# ---- loading ---------------------------------------------------------------------------------------------
def _generic(doc: Mapping, where: str) -> Example:
    """An example in our own JSONL form."""
    if not isinstance(doc, Mapping):
        raise ZeroShotError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if "gold" not in doc:
        raise ZeroShotError(f"{where}: missing field 'gold'")
    gold = doc["gold"]
    if "continuation" in doc:
        items, kind = doc.get("contexts"), "contexts"
    else:
        items, kind = doc.get("choices"), "choices"
        if not isinstance(doc.get("context"), str):
            raise ZeroShotError(f"{where}: missing string field 'context' (or 'contexts' with 'continuation')")
    if not isinstance(items, list) or len(items) < 2 or not all(isinstance(c, str) for c in items):
        raise ZeroShotError(f"{where}: '{kind}' must be a list of at least 2 strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(items):
        raise ZeroShotError(f"{where}: gold {gold!r} is not an index into its {len(items)} {kind}")
    if kind == "contexts":
        return partial_contexts(items, str(doc["continuation"]), gold, doc.get("delimiter", " "))
    return multiple_choice(doc["context"], items, gold, doc.get("delimiter", " "))


def read_jsonl(path: str | os.PathLike, convert: Callable[[Mapping, str], Example] | None = None,
               limit: int | None = None) -> list[Example]:
    """Examples of a JSONL file, every line checked (ZeroShotError naming the file and line)."""
    path = epath.Path(path)  # local, or gs:// on a TPU VM
    if not path.is_file():
        raise ZeroShotError(f"task file {path} does not exist")
    examples = []
    with path.open("r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise ZeroShotError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            examples.append(convert(doc, where) if convert else _generic(doc, where))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ZeroShotError(f"task file {path} holds no examples")
    return examples


def _named(spec: TaskSpec):
    def convert(doc, where):
        if not isinstance(doc, Mapping):
            raise ZeroShotError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        missing = [f for f in spec.fields if f not in doc]
        if missing:
            raise ZeroShotError(f"{where}: missing field {missing[0]!r} (this task's docs need "
                                f"{', '.join(spec.fields)})")
        try:
            return spec.convert(doc)
        except ZeroShotError as e:
            raise ZeroShotError(f"{where}: {e}") from None
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ZeroShotError(f"{where}: malformed doc ({type(e).__name__}: {e})") from None
    return convert


def _tfds_examples(name: str, spec: TaskSpec, data_dir, limit) -> list[Example]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ZeroShotError(f"task {name} from TFDS needs tensorflow-datasets (pip install tensorflow-datasets)")
    try:
        builder = tfds.builder(spec.tfds, data_dir=data_dir)
        dataset = builder.as_dataset(split=spec.split)
    except Exception as e:  # tfds raises many kinds when a dataset is not prepared
        raise ZeroShotError(f"task {name}: TFDS dataset {spec.tfds} ({spec.split}) is not available in "
                            f"{data_dir or 'the default data_dir'}: {str(e).splitlines()[0][:200]}") from None
    convert = _named(spec)
    examples = []
    for i, doc in enumerate(tfds.as_numpy(dataset)):
        examples.append(convert(_plain(doc), f"{spec.tfds} example {i}"))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _plain(x):
    """tfds.as_numpy output -> plain Python (bytes to str, arrays to lists)."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, np.generic):
        return x.item()
    return x


def load_task(spec: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> Task:
    """A task from `spec`: a .jsonl file (our form), a named task (`TASKS`; DATA_DIR/NAME.jsonl in the
    dataset's raw fields if present, else TFDS), or tfds:NAME for a named task forced from TFDS."""
    if spec.endswith(".jsonl") or os.sep in spec:
        return Task(Path(spec).stem, tuple(read_jsonl(spec, limit=limit)), str(spec))
    force_tfds = spec.startswith("tfds:")
    name = spec[5:] if force_tfds else spec
    if name not in TASKS:
        raise ZeroShotError(f"unknown task {spec!r}: expected a .jsonl file, one of {', '.join(TASKS)}, or a suite "
                            f"({', '.join(SUITES)})")
    task_spec = TASKS[name]
    local = epath.Path(data_dir) / f"{name}.jsonl" if data_dir is not None else None
    if not force_tfds and local is not None and local.is_file():
        return Task(name, tuple(read_jsonl(local, _named(task_spec), limit)), str(local))
    if task_spec.tfds is None:
        raise ZeroShotError(f"task {name} is not in TFDS: put its {task_spec.split} docs ({', '.join(task_spec.fields)}"
                            f") in {data_dir or 'DATA_DIR'}/{name}.jsonl and pass --data-dir")
    return Task(name, tuple(_tfds_examples(name, task_spec, data_dir, limit)), f"tfds:{task_spec.tfds}")


def task_names(specs: Iterable[str]) -> list[str]:
    """Task specs with suite names expanded, in order, without repeats."""
    out: list[str] = []
    for spec in specs:
        for name in SUITES.get(spec, (spec,)):
            if name not in out:
                out.append(name)
    return out


