"""The seed papers' setups as presets: the full-scale commands (TPU) and a scaled-down version runnable here.

    python experiments/papers.py list
    python experiments/papers.py show PRESET [--scale full|cpu] [--out DIR] [--parent P] [--data-dir D]
    python experiments/papers.py run PRESET --scale cpu [--out DIR]          # runs the commands here
    python experiments/papers.py tpu PRESET --name TPU --zone Z [--dry-run]  # all steps, on every worker of a slice

A preset is a list of commands: build the models (family / shear / pretrain), score them zero-shot, render the
table beside the paper's numbers (`python -m plrd_jax tables`). Full scale follows the paper (parents, sizes,
token budgets, batch shapes); the `cpu` scale keeps the same pipeline with the embedded parent
(SmolLM2-135M), WikiText-2 text, small token budgets and local cloze tasks for the zero-shot step.
Placeholders: {out} the run directory, {parent} the parent checkpoint (an HF directory on every worker, e.g.
a gcsfuse mount), {data_dir} the TFDS data_dir (gs://BUCKET/tfds) with the prepared datasets and the
NAME.jsonl files of LogiQA and MMLU, {sources} Sheared-LLaMA's RedPajama domains as NAME=SOURCE,...
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ["python", "-m", "plrd_jax"]
CPU_TASKS = ["--task", "{out}/tasks/plrd_cloze.jsonl", "--task", "{out}/tasks/plrd_partial.jsonl"]
MAKE_TASKS = ["python", "experiments/zeroshot_vs_lmeval.py", "--make-tasks", "{out}/tasks"]


@dataclasses.dataclass(frozen=True)
class Preset:
    paper: str
    setup: str  # what the full scale reproduces
    accelerator: str  # a slice the full scale fits on
    full: tuple[tuple[str, ...], ...]
    cpu: tuple[tuple[str, ...], ...]


def _family(schedule, members, extra=()):
    """family run + zero-shot PLRD suite on every member + table (full scale)."""
    steps = [(*CLI, "family", "--parent", "{parent}", "--schedule", schedule, "--out", "{out}",
              "--data", "tfds:c4/en", "--eval-data", "tfds:c4/en:validation", "--data-dir", "{data_dir}",
              "--dtype", "bfloat16", "--mesh", "1,-1,1", "--save-every", "200", *extra)]
    for m in range(members):
        steps.append((*CLI, "zeroshot", "--model", f"{{out}}:{m}", "--task", "plrd", "--data-dir", "{data_dir}",
                      "--out", f"{{out}}/zeroshot-{m}.json"))
    steps.append((*CLI, "tables", "{out}", *[x for m in range(members) for x in
                                            ("--zeroshot", f"{{out}}/zeroshot-{m}.json")], "--out", "{out}/tables.md"))
    return tuple(steps)


def _family_cpu(schedule_args, members):
    steps = [tuple(MAKE_TASKS), (*CLI, "family", "--parent", "smollm2-135m", *schedule_args, "--out", "{out}")]
    for m in members:
        steps.append((*CLI, "zeroshot", "--model", f"{{out}}:{m}", *CPU_TASKS, "--out", f"{{out}}/zeroshot-{m}.json"))
    steps.append((*CLI, "tables", "{out}", *[x for m in members for x in ("--zeroshot", f"{{out}}/zeroshot-{m}.json")],
                  "--out", "{out}/tables.md"))
    return tuple(steps)


def _shear(preset):
    return ((*CLI, "shear", "--parent", "{parent}", "--preset", preset, "--out", "{out}", "--source", "{sources}",
             "--data-dir", "{data_dir}", "--dtype", "bfloat16", "--save-every", "500"),
            (*CLI, "zeroshot", "--model", "{out}:100", "--task", "sheared", "--data-dir", "{data_dir}",
             "--out", "{out}/zeroshot-100.json"),
            (*CLI, "tables", "{out}", "--zeroshot", "{out}/zeroshot-100.json", "--out", "{out}/tables.md"))


def _pretrain(size, methods=("full", "cola", "sltrain")):
    steps = [(*CLI, "pretrain", "--preset", f"llama-{size}", "--method", m, "--out", f"{{out}}/{m}",
              "--data", "tfds:c4/en", "--eval-data", "tfds:c4/en:validation", "--data-dir", "{data_dir}",
              "--tokenizer", "t5-base") for m in methods]
    steps.append((*CLI, "tables", *[f"{{out}}/{m}" for m in methods], "--out", "{out}/tables.md"))
    return tuple(steps)


def _pretrain_cpu(methods=("full", "cola", "sltrain")):
    steps = [(*CLI, "pretrain", "--preset", "llama-20m", "--method", m, "--out", f"{{out}}/{m}", "--steps", "40",
              "--batch-size", "8", "--seq-len", "128", "--eval-tokens", "16384", "--eval-every", "20",
              "--dtype", "float32") for m in methods]
    steps.append((*CLI, "tables", *[f"{{out}}/{m}" for m in methods], "--out", "{out}/tables.md"))
    return tuple(steps)


PLRD_CPU = ("--schedule", "0.9,0.6", "--heal-tokens", "8192", "--eval-tokens", "2048")
PRESETS: dict[str, Preset] = {
    "plrd-llama2-7b": Preset(
        "PLRD (arXiv 2406.19995)", "LLaMA-2-7B → 3.3B through ranks 2048, 1536, 1216; 1B healing tokens",
        "v5p-64", _family("llama2-7b-3.3b", 3), _family_cpu(PLRD_CPU, (0, 1))),
    "plrd-mistral-7b": Preset(
        "PLRD (arXiv 2406.19995)", "Mistral-7B-v0.1 → 3.1B through ranks 2048, 1536, 1088; 1B healing tokens",
        "v5p-64", _family("mistral-7b-3.1b", 3), _family_cpu(PLRD_CPU, (0, 1))),
    "sheared-llama2-7b-1.3b": Preset(
        "Sheared-LLaMA (ICLR 2024)", "LLaMA-2-7B → 1.3B (24 layers, d 2048, 16 heads, 5504): 0.4B pruning + 50B "
        "continued tokens, dynamic batch loading over 7 RedPajama domains", "v5p-128",
        _shear("llama2-7b-1.3b"),
        (tuple(MAKE_TASKS), (*CLI, "shear", "--parent", "smollm2-135m", "--preset", "sheared-smollm2", "--out", "{out}",
                             "--prune-tokens", "4096", "--continue-tokens", "4096"),
         (*CLI, "zeroshot", "--model", "{out}:100", *CPU_TASKS, "--out", "{out}/zeroshot-100.json"),
         (*CLI, "tables", "{out}", "--zeroshot", "{out}/zeroshot-100.json", "--out", "{out}/tables.md"))),
    "sheared-llama2-7b-2.7b": Preset(
        "Sheared-LLaMA (ICLR 2024)", "LLaMA-2-7B → 2.7B (32 layers, d 2560, 20 heads, 6912): 0.4B pruning + 50B "
        "continued tokens", "v5p-128", _shear("llama2-7b-2.7b"), ()),
    **{f"galore-{size}": Preset(
        "GaLore benchmark (CoLA, SLTrain)", f"LLaMA-{size} from scratch on C4 (T5 tokenizer, seq 256, 512 seq/step): "
        "full rank, CoLA, SLTrain", accel, _pretrain(size), _pretrain_cpu())
        for size, accel in (("60m", "v5litepod-8"), ("130m", "v5litepod-8"), ("350m", "v5litepod-16"),
                            ("1b", "v5p-32"))},
}


def fill(step, values: dict[str, str]) -> list[str]:
    return [word.format(**values) for word in step]


def commands(name: str, scale: str, values: dict[str, str]) -> list[list[str]]:
    if name not in PRESETS:
        raise SystemExit(f"error: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    steps = getattr(PRESETS[name], scale)
    if not steps:
        raise SystemExit(f"error: preset {name} has no {scale} scale (see the other size of the same paper)")
    return [fill(step, values) for step in steps]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list")
    for action in ("show", "run", "tpu"):
        s = sub.add_parser(action)
        s.add_argument("preset")
        s.add_argument("--scale", choices=["full", "cpu"], default="cpu" if action == "run" else "full")
        s.add_argument("--out", default=None, help="run directory (default runs/PRESET-SCALE)")
        s.add_argument("--parent", default="{parent}")
        s.add_argument("--data-dir", default="{data_dir}")
        s.add_argument("--sources", default="{sources}")
        if action == "tpu":
            s.add_argument("--name", required=True)
            s.add_argument("--zone", required=True)
            s.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.action == "list":
        for name, preset in PRESETS.items():
            scales = "full + cpu" if preset.cpu else "full"
            print(f"{name:24s} {preset.paper}: {preset.setup} [{scales}; full scale on {preset.accelerator}]")
        return
    out = args.out or f"runs/{args.preset}-{args.scale}"
    values = {"out": out, "parent": args.parent, "data_dir": args.data_dir, "sources": args.sources}
    steps = commands(args.preset, args.scale, values)
    if args.action == "show":
        print("\n".join(shlex.join(s) for s in steps))
    elif args.action == "run":
        for step in steps:
            print(f"$ {shlex.join(step)}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable if step[0] == "python" else step[0], *step[1:]], cwd=ROOT, check=True)
    else:  # one launch: every worker runs the steps in order (each step is a multi-host run of its own)
        script = " && ".join(shlex.join(step) for step in steps)
        launch = [sys.executable, str(ROOT / "tpu" / "tpu.py"), "launch", "--name", args.name, "--zone", args.zone,
                  "--run", f"{args.preset}-{args.scale}", *(["--dry-run"] if args.dry_run else []),
                  "--", "bash", "-c", script]
        raise SystemExit(subprocess.run(launch).returncode)

if __name__ == "__main__":
    main()
