"""`export`: write a Hugging Face safetensors directory (dense weights)."""
from __future__ import annotations

from plrd_jax.cli.common import DEFAULT_MODEL, check_out_dir

RESUMES = False


def register(subparsers) -> None:
    x = subparsers.add_parser("export", help="write a Hugging Face safetensors directory (dense weights)")
    x.add_argument("--model", default=DEFAULT_MODEL)
    x.add_argument("--out", required=True)
    x.add_argument("--force", action="store_true", help="replace --out if it already holds a checkpoint")
    x.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.io.hf import check_save_target, save_hf
    from plrd_jax.io.load import load_model

    check_out_dir(args.out)  # all before the model loads
    check_save_target(args.out, overwrite=args.force, hint="pass --force")
    config, params, tokenizer = load_model(args.model)
    save_hf(params, config, args.out, tokenizer=tokenizer, overwrite=args.force)
    print(f"wrote {args.out} (dense safetensors + config.json)")
