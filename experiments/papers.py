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

from plrd_jax.configs import Presets

ROOT = Path(__file__).resolve().parents[1]
CLI = ["python", "-m", "plrd_jax"]


@dataclasses.dataclass(frozen=True)
class Preset:
    paper: str
    setup: str  # what the full scale reproduces
    accelerator: str  # a slice the full scale fits on
    full: tuple[tuple[str, ...], ...]
    cpu: tuple[tuple[str, ...], ...]


PRESETS = Presets("papers", Preset)  # plrd_jax/configs/papers/*.toml


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
