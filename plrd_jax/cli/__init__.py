"""Command line: `python -m plrd_jax {eval,info,generate,export,family,compress,shear,pretrain,zeroshot,tables} ...`.

Every `--model` takes the embedded parent's short name (`smollm2-135m`), a .gguf file, a Hugging Face
safetensors directory, or a stored family member `FAMILY_DIR:N` / `FAMILY_DIR:NAME`.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from plrd_jax.cli import compress, eval, export, family, generate, info, plan, pretrain, shear, tables, zeroshot
from plrd_jax.cli.common import DEFAULT_MODEL, Parser, describe_os_error, known_errors, report
from plrd_jax.cli.family import family_schedule  # noqa: F401  (tests and scripts import it from here)

# glibc malloc settings that keep freed memory in the process: large blocks come from the heap instead of mmap,
# the heap is never trimmed, and all threads share the main arena (the others cannot hold blocks over 64 MB).
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"

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


def keep_freed_memory() -> None:
    """Restart this command once with GLIBC_TUNABLES=KEEP_FREED_MEMORY when JAX computes on the host CPU.

    XLA:CPU allocates each step's buffers (the logits alone are 200 MB per 1024 tokens of a 49K vocabulary) and
    frees them when the step ends; with glibc's defaults every block that large is a fresh mmap, so each step
    faults its pages in again (tens of millions of page faults in the main job, paid as system time, and more
    on virtual machines that hand freed pages back to their host). Kept in the heap, the pages are reused.
    glibc reads the setting only at start-up, hence the restart. Nothing happens off glibc, with an
    accelerator present (/dev/accel*, /dev/nvidia*, /dev/vfio/N) unless JAX_PLATFORMS=cpu, or when
    GLIBC_TUNABLES is already set (set it to "" to keep glibc's defaults)."""
    import platform

    if "GLIBC_TUNABLES" in os.environ or platform.libc_ver()[0] != "glibc" or not sys.executable:
        return
    accelerators = glob.glob("/dev/accel*") + glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/vfio/[0-9]*")
    if accelerators and os.environ.get("JAX_PLATFORMS", "").lower() != "cpu":
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, "GLIBC_TUNABLES": KEEP_FREED_MEMORY})


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
           "KEEP_FREED_MEMORY"]
