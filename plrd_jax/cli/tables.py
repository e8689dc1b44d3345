"""`tables`: Markdown tables of our runs beside the papers' published numbers."""
from __future__ import annotations

import jax

from plrd_jax.cli.common import check_out_file, write_text_file

RESUMES = False


def register(subparsers) -> None:
    tb = subparsers.add_parser("tables", help="Markdown tables of our runs beside the papers' published numbers")
    tb.add_argument("paths", nargs="+", help="family directories and experiment result .json files")
    tb.add_argument("--zeroshot", action="append", default=[], help="zeroshot --out JSON files (repeatable)")
    tb.add_argument("--out", default=None, help="also write the Markdown here")
    tb.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.reporting.papers import collect, render

    if args.out:
        check_out_file(args.out)
    table = render(collect(args.paths, args.zeroshot))
    print(table)
    if args.out and jax.process_index() == 0:
        write_text_file(args.out, table)
        print(f"wrote {args.out}")
