"""`export`: write a model as a Hugging Face directory (factors kept, or dense) or a GGUF, with a model card."""
from __future__ import annotations

import shlex

from plrd_jax.cli.common import DEFAULT_MODEL, check_out_dir

RESUMES = False


def register(subparsers) -> None:
    from plrd_jax.io.export import DENSIFY_MODES, EXPORT_DTYPES, FORMATS

    x = subparsers.add_parser("export", help="write a Hugging Face directory (factorized or dense) or a GGUF")
    x.add_argument("--model", default=DEFAULT_MODEL, help="a short name, .gguf, HF directory or FAMILY_DIR:N")
    x.add_argument("--out", required=True, help="the directory to write")
    x.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: safetensors directory (factorized members load with trust_remote_code=True); "
                        "gguf: llama.cpp's format, dense members only")
    x.add_argument("--dtype", choices=EXPORT_DTYPES, default=None,
                   help="weight dtype (default: the model's own); q8_0 for --format gguf only")
    x.add_argument("--densify", choices=DENSIFY_MODES, default="auto",
                   help="auto: write dense every matrix whose rank is at or above its break-even "
                        "d_in·d_out/(d_in+d_out); all: every matrix dense; none: keep every factorization")
    x.add_argument("--force", action="store_true", help="replace --out if it already holds an exported model")
    x.set_defaults(func=run, resumes=RESUMES)


def run(args) -> None:
    from plrd_jax.io.export import check_export_target, check_options, export_model, load_for_export

    check_out_dir(args.out)  # all before the model loads
    check_export_target(args.out, force=args.force, hint="pass --force")
    check_options(args.format, args.dtype, args.densify)
    config, params, tokenizer, meta = load_for_export(args.model)
    summary = export_model(params, config, args.out, tokenizer=tokenizer, format=args.format, dtype=args.dtype,
                           densify=args.densify, force=args.force, meta=meta, source=str(args.model),
                           command=command_line(args))
    kind = "GGUF" if args.format == "gguf" else "factorized HF" if summary["factorized"] else "dense HF"
    print(f"wrote {args.out} ({kind}: {summary['params']:,} weights in {summary['dtype']}, "
          f"{summary['weight_bytes'] / 2**20:.1f} MiB; {summary['factorized']} matrices factorized, "
          f"{summary['dense']} dense)")


def command_line(args) -> str:
    """The export command as a shell line (for the model card), every option spelled out."""
    argv = ["python", "-m", "plrd_jax", "export", "--model", str(args.model), "--out", str(args.out), "--format",
            args.format, "--densify", args.densify]
    argv += ["--dtype", args.dtype] if args.dtype else []
    return shlex.join(argv + (["--force"] if args.force else []))
