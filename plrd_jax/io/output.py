"""Output locations: checked for writability before long work, written through a temporary sibling that
replaces the target only when everything is written (a failure or Ctrl-C leaves the target as it was)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError


class OutputError(ValueError):
    """An output location (file or directory) this process cannot create or write."""


class WriteError(OutputError, OSError):
    """Writing an output failed midway (disk full, file too large): an OutputError for the CLI's one-line report,
    and still the OSError it was for callers that catch those."""


def missing_ancestors(path: Path) -> list[Path]:
    """`path` and its parents that do not exist yet, innermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike):
    """Yield a temporary sibling of `out` to write into; on success it replaces `out` (renames), on any failure
    it is removed and `out` is left as it was. A write error (disk full, file too large) becomes an OutputError
    naming `out`."""
    out = Path(out).absolute()
    created = missing_ancestors(out.parent)  # innermost first: removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        reason = getattr(e, "strerror", None) or str(e).replace("\n", " ")
        raise WriteError(f"writing {out} failed ({reason}); nothing was written there") from None


def check_writable(path: str | os.PathLike, file: bool = False) -> None:
    """Raise OutputError unless this process can create `path` (a directory, or a file with `file`) or write into
    it where it exists. Creates nothing: a probe file in the nearest existing directory is removed at once.
    Remote paths (`gs://...`) are left to their own client."""
    text = os.fspath(path)
    if "://" in text:
        return
    target = Path(text).expanduser().absolute()
    if target.is_dir() and file:
        raise OutputError(f"cannot write {target}: it is a directory")
    if target.exists() and not target.is_dir() and not file:
        raise OutputError(f"cannot write {target}: it is a file, not a directory")
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot create {target}: {folder} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".plrd-write-probe-", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {folder} is not writable ({e.strerror})") from None
    os.close(handle)
    os.unlink(probe)
