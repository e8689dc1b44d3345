"""What several commands share: defaults, argument types, progress bars, evaluation corpora, summaries, and the
classes of errors the command line reports as one line."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import jax

DEFAULT_MODEL = "smollm2-135m"
# The main job's calibration and healing text: the training splits of three domains and, in equal share, text
# the parent writes itself (experiments/results/heal_data.md measures the choice); tiny-shakespeare and pydoc
# stay unseen.
DEFAULT_HEAL_DATA = "wikitext2-heal,books-heal,speeches-heal,parent-samples"
DEFAULT_EVAL_DATA = "wikitext2-eval,books-eval,speeches-eval,tinyshakespeare,pydoc"
DTYPES = ["float32", "bfloat16"]
DECOMPOSITIONS = ["svd", "whitened", "asvd", "fisher"]
ALLOCATIONS = ["uniform", "energy", "sensitivity"]
MESH_HELP = "data,fsdp,tensor mesh shape (-1: the rest)"


# ---- the parser ---------------------------------------------------------------------------------
class UsageError(ValueError):
    """A command line the parser refuses (reported as one line, like every other user error)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a refused command line raises UsageError (one line: the problem and where help is)
    instead of printing the usage block and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be {what}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")  # argparse type: an integer >= 1
nonnegative_int = _int_at_least(0, "0 or more")  # argparse type: an integer >= 0


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def reduction_fraction(text: str) -> float:
    """argparse type of --reduction: a fraction strictly between 0 and 1."""
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} must lie strictly between 0 and 1 (0.2 = 20% fewer params)")
    return value


def density_fraction(text: str) -> float:
    """argparse type of --sparse-density: a fraction in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} must lie in [0, 1)")
    return value


# ---- checks before any work ---------------------------------------------------------------------
def check_seq_len(seq_len: int, context: int):
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is larger than the model's context of {context} tokens")


def check_out_dir(path, flag: str = "--out") -> None:
    """Refuse an output directory this process cannot create or write, before any model is loaded."""
    from plrd_jax.io.output import OutputError, check_writable

    try:
        check_writable(path)
    except OutputError as err:
        raise OutputError(f"{flag}: {err}") from None


def check_out_file(path, flag: str = "--out") -> None:
    """Refuse an output file this process cannot create or write, before any work."""
    from plrd_jax.io.output import OutputError, check_writable

    try:
        check_writable(path, file=True)
    except OutputError as err:
        raise OutputError(f"{flag}: {err}") from None


def check_sources(*specs: str, data_dir=None) -> None:
    """Read every local text source the specs name (sources or mixtures) once, so that a missing file or one that
    is not UTF-8 fails by name before the model loads; streamed (tfds:) sources and parent-samples are not read."""
    from plrd_jax.data.corpora import PARENT_SAMPLES, load_documents
    from plrd_jax.data.mixture import parse_mixture

    names = {name for spec in specs if spec for name in parse_mixture(spec)}
    for name in sorted(names):
        if not name.startswith("tfds:") and name != PARENT_SAMPLES:
            for _ in load_documents(name, data_dir):
                pass


def write_text_file(path: str, text: str) -> None:
    """`text` to `path` through a temporary sibling renamed into place (an interrupted write leaves nothing)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- progress and summaries ---------------------------------------------------------------------
class progress_bar:
    """A tqdm bar on stderr (the library reports progress through callbacks; the CLI draws it)."""

    def __init__(self, total, desc, unit="it"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


def evaluation_corpora(args, tokenizer, train_specs, seq_len=None):
    """(corpora {name: TokenDataset}, unseen names) for --eval-data, after checking that no corpus shares text
    with the calibration / healing sources (`train_specs`: mixture specs) — before any model runs."""
    from plrd_jax.data.corpora import check_disjoint, domain_of
    from plrd_jax.data.mixture import load_corpora, parse_mixture

    train = [name for spec in train_specs for name in parse_mixture(spec)]
    corpora = load_corpora(args.eval_data, tokenizer, seq_len or args.eval_seq_len, args.eval_tokens,
                           data_dir=args.data_dir)
    check_disjoint(corpora, train, data_dir=args.data_dir)
    seen_domains = {domain_of(n) for n in train}
    unseen = [n for n in corpora if domain_of(n) not in seen_domains]
    return corpora, unseen


def print_summary(out_dir, prefix, results, parent_params, parent_ppl, unseen, title):
    """The members' table (a column per corpus, ratios to the parent, geometric mean) and the plot, written to
    OUT/{prefix}summary.md, .csv and OUT/{prefix}ppl_ratios.png."""
    from plrd_jax.reporting.plots import plot_ratios
    from plrd_jax.reporting.tables import markdown_table, summary_columns, summary_rows, write_csv

    columns = summary_columns(list(parent_ppl), unseen)
    rows = summary_rows(results, parent_params, parent_ppl, unseen)
    table = markdown_table(rows, columns)
    with open(os.path.join(out_dir, f"{prefix}summary.md"), "w") as f:
        f.write(table)
    write_csv(os.path.join(out_dir, f"{prefix}summary.csv"), rows, columns)
    plot_ratios(os.path.join(out_dir, f"{prefix}ppl_ratios.png"), results, parent_params, parent_ppl, unseen, title)
    print(table)
    print(f"wrote {out_dir}/{prefix}summary.md, {prefix}summary.csv, {prefix}ppl_ratios.png")


def parent_samples(model, config, params, tokenizer, count, seq_len, temperature, seed, out_dir=None):
    """`count` windows the parent writes itself at `temperature` (the mixture source parent-samples); with
    out_dir they are generated once and kept in OUT/parent_samples_*.npy (a rerun reads them back). None when
    count is 0."""
    import hashlib

    import numpy as np

    from plrd_jax.evaluation.generate import sample_windows

    if count == 0:
        return None
    start = tokenizer.token_to_id("<|endoftext|>") if hasattr(tokenizer, "token_to_id") else None
    start = start if start is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                                             else tokenizer.eos_token_id)
    key = hashlib.sha256(json.dumps([model, count, seq_len, temperature, seed, start]).encode()).hexdigest()[:16]
    path = None if out_dir is None else os.path.join(out_dir, f"parent_samples_{key}.npy")
    if path is not None and os.path.isfile(path):
        return np.load(path)
    print(f"sampling {count} windows of {seq_len} tokens from the parent (temperature {temperature})",
          file=sys.stderr)
    windows = np.asarray(sample_windows(config, params, count, seq_len, start, temperature, seed))
    if path is not None and jax.process_index() == 0:
        try:
            np.save(path + ".tmp.npy", windows)
            os.replace(path + ".tmp.npy", path)
        finally:
            if os.path.exists(path + ".tmp.npy"):
                os.unlink(path + ".tmp.npy")
    return windows


# ---- errors -------------------------------------------------------------------------------------
def known_errors() -> tuple[type[BaseException], ...]:
    """User-facing error classes: printed as one line, not as a traceback (every library error class is a
    ValueError subclass)."""
    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


def report(message: str) -> None:
    """One line on stderr, tagged with the process index in a multi-process run (every process reports)."""
    multi = jax.distributed.is_initialized() and jax.process_count() > 1
    print(f"[process {jax.process_index()}] {message}" if multi else message, file=sys.stderr, flush=True)


def describe_os_error(err: OSError) -> str:
    """One line for an OSError the checks could not foresee (disk full, permissions changed mid-run)."""
    if err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


class StepBars:
    """One tqdm progress bar per running stage (member or phase), on stderr; `close()` ends every open one."""

    def __init__(self):
        self.bars = {}

    def open(self, key, total: int, desc: str, initial: int = 0) -> None:
        from tqdm.auto import tqdm

        self.bars[key] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                              initial=initial)

    def close(self):
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


# glibc malloc settings that keep freed memory in the process: large blocks come from the heap instead of mmap,
# the heap is never trimmed, and all threads share the main arena (the others cannot hold blocks over 64 MB).
KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"


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


def release_freed_memory() -> None:
    """Hand the memory that malloc keeps under KEEP_FREED_MEMORY back to the system (glibc's `malloc_trim`):
    between phases of a run (a compile, a checkpoint, an evaluation, a member), whose buffers have other sizes
    than the next phase's, so that what one freed does not stay resident beside the next. Not between steps:
    reusing those pages is the point. Nothing happens without the setting."""
    if os.environ.get("GLIBC_TUNABLES") == KEEP_FREED_MEMORY:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
