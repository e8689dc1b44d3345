"""Command line: `python -m plrd_jax {eval,info,generate,export,family,compress,shear,pretrain,zeroshot,tables} ...`.

Every `--model` takes the embedded parent's short name (`smollm2-135m`), a .gguf file, a Hugging Face
safetensors directory, or a stored family member `FAMILY_DIR:N` / `FAMILY_DIR:NAME`.
"""
from __future__ import annotations

import argparse
import os

from plrd_jax.cli import compress, eval, export, family, generate, info, plan, pretrain, shear, tables, zeroshot
from plrd_jax.cli.common import (DEFAULT_MODEL, KEEP_FREED_MEMORY, Parser, describe_os_error, keep_freed_memory,
                                 known_errors, release_freed_memory, report)
from plrd_jax.cli.family import family_schedule  # noqa: F401  (tests and scripts import it from here)

COMMANDS = (eval, info, generate, export, family, compress, shear, pretrain, plan, zeroshot, tables)  # --help order


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m plrd_jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv=None) -> int:
    """Run one command. A user error (bad flag, unreadable file, unwritable output, ...) is one line on stderr,
    `error: ...`, exit status 2 (1 for an operating-system failure nobody could check up front); Ctrl-C is one
    line too, exit status 130. Called from the command line (argv None) on a machine without accelerators, it
    first restarts itself once with malloc keeping freed memory (`keep_freed_memory`)."""
    if argv is None:
        keep_freed_memory()
    args = None
    try:
        args = build_parser().parse_args(argv)
        from plrd_jax.training.distributed import initialize, main_process_output

        initialize()  # a multi-host run when the environment says so (tpu/tpu.py launch); else nothing
        use_compilation_cache()
        with main_process_output():  # logs and progress bars from process 0 only
            args.func(args)
    except KeyboardInterrupt:
        report("interrupted; rerun the same command to resume" if getattr(args, "resumes", False)
               else "interrupted")
        return 130
    except known_errors() as err:
        report(f"error: {err}")
        return 2
    except OSError as err:
        report(f"error: {describe_os_error(err)}")
        return 1
    return 0


def use_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache, so that a resumed or repeated run loads its compiled steps
    instead of compiling them again: `$PLRD_COMPILATION_CACHE` (default `~/.cache/plrd_jax/xla`; empty or "off"
    disables it). An explicit `JAX_COMPILATION_CACHE_DIR` wins. Every program that took ≥ 1 s to compile is kept."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    where = os.environ.get("PLRD_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "plrd_jax",
                                                                 "xla"))
    if where and where != "off":
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


__all__ = ["main", "build_parser", "family_schedule", "DEFAULT_MODEL", "use_compilation_cache", "keep_freed_memory",
           "release_freed_memory", "KEEP_FREED_MEMORY"]
