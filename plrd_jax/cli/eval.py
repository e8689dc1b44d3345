"""`eval`: perplexity over non-overlapping windows."""
from __future__ import annotations

import json
import sys

from plrd_jax.cli.common import DEFAULT_MODEL, DTYPES, check_seq_len, check_sources, positive_int, progress_bar

RESUMES = False


def register(subparsers) -> None:
    e = subparsers.add_parser("eval", help="perplexity over non-overlapping windows")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--data", default="wikitext2-test",
                   help="pydoc, wikitext2-test, wikitext2-heal, wikitext2-eval, tinyshakespeare, books[-heal|-eval], "
                        "speeches[-heal|-eval], a file/glob, tfds:NAME; several comma-separated")
    e.add_argument("--data-dir", default=None, help="TFDS data_dir (e.g. gs://bucket/tfds)")
    e.add_argument("--seq-len", type=positive_int, default=512)
    e.add_argument("--max-tokens", type=positive_int, default=None,
                   help="score only the first ceil(N/seq_len) windows")
    e.add_argument("--batch-size", type=positive_int, default=4)
    e.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype")
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    e.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.data.windows import load_dataset
    from plrd_jax.evaluation.perplexity import perplexity
    from plrd_jax.io.load import load_model

    names = [n.strip() for n in args.data.split(",")]
    check_sources(*names, data_dir=args.data_dir)  # a missing or undecodable file fails before the model loads
    config, params, tokenizer = load_model(args.model, dtype=args.dtype)
    check_seq_len(args.seq_len, config.max_seq_len)
    windows = -(-args.max_tokens // args.seq_len) if args.max_tokens else None
    data = {}
    for name in names:  # every corpus read (and checked) before the model runs
        data[name] = load_dataset(name, tokenizer, args.seq_len, data_dir=args.data_dir, max_windows=windows)
    for name, corpus in data.items():
        with progress_bar(len(corpus), f"eval {name}", "win") as bar:
            result = perplexity(config, params, corpus.windows, batch_size=args.batch_size,
                                progress=lambda done, total: bar.update(done - bar.n))
        print(f"model {args.model}  data {name}  window {result.seq_len}  windows {result.windows}  "
              f"tokens scored {result.tokens}  mean NLL {result.nll:.4f}  PPL {result.ppl:.3f}")
        if windows is not None and result.windows < windows:
            print(f"notice: {name} holds only {result.windows} windows of {result.seq_len} tokens, fewer than "
                  f"--max-tokens {args.max_tokens} asks for; scored {result.tokens} tokens", file=sys.stderr)
        if args.json:
            print(json.dumps({"model": args.model, "data": corpus.spec, **result.to_dict()}))
