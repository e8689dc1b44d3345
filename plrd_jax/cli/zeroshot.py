"""`zeroshot`: zero-shot multiple-choice accuracy (lm-eval scoring: acc, acc_norm)."""
from __future__ import annotations

import json

import jax

from plrd_jax.cli.common import DEFAULT_MODEL, DTYPES, check_out_file, positive_int, progress_bar, write_text_file

RESUMES = False


def register(subparsers) -> None:
    z = subparsers.add_parser("zeroshot", help="zero-shot multiple-choice accuracy (lm-eval scoring: acc, acc_norm)")
    z.add_argument("--model", default=DEFAULT_MODEL)
    z.add_argument("--task", action="append", required=True,
                   help="a .jsonl file, a task name (boolq, winogrande, hellaswag, piqa, arc_easy, arc_challenge, "
                        "sciq, logiqa, mmlu), tfds:NAME, or a suite (plrd, sheared); repeatable")
    z.add_argument("--data-dir", default=None, help="NAME.jsonl files of named tasks, or the TFDS data_dir")
    z.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    z.add_argument("--batch-size", type=positive_int, default=16)
    z.add_argument("--bos", action="store_true", help="prepend BOS to every request (lm-eval add_bos_token=True)")
    z.add_argument("--dtype", choices=DTYPES, default=None)
    z.add_argument("--out", default=None, help="JSON with every task's scores and per-choice log-likelihoods")
    z.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.evaluation.tasks import load_task, task_names
    from plrd_jax.evaluation.zeroshot import evaluate_task
    from plrd_jax.io.load import load_model
    from plrd_jax.reporting.tables import markdown_table

    if args.out:
        check_out_file(args.out)
    tasks = [load_task(name, args.data_dir, args.limit) for name in task_names(args.task)]  # all checked first
    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model} carries no tokenizer; zero-shot scoring needs one")
    results = []
    for task in tasks:
        with progress_bar(None, task.name, "req") as bar:
            def progress(done, total, bar=bar):
                bar.total = total
                bar.update(done - bar.n)
            results.append(evaluate_task(config, params, tokenizer, task, batch_size=args.batch_size,
                                         add_bos=args.bos, progress=progress))
    rows = [[r.task, str(r.examples), f"{100 * r.acc:.2f}", f"{100 * r.acc_norm:.2f}", f"{100 * r.acc_stderr:.2f}",
             t.source] for r, t in zip(results, tasks)]
    print(f"model {args.model}, zero-shot, lm-eval scoring{' (BOS prepended)' if args.bos else ''}")
    print(markdown_table(rows, ("task", "examples", "acc %", "acc_norm %", "± stderr", "data")))
    if args.out and jax.process_index() == 0:
        write_text_file(args.out, json.dumps({
            "model": args.model, "bos": args.bos,
            "tasks": {r.task: {**r.summary(), "source": t.source, "lls": r.lls, "golds": r.golds}
                      for r, t in zip(results, tasks)}}))
        print(f"wrote {args.out}")
