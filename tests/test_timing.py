"""The benchmarks' process round robin: each worker's malloc settings, and the page faults it reports."""
import platform
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import timing  # noqa: E402

BUFFER_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MB)


def fresh_buffer_step():
    """A step that allocates and fills a 64 MB buffer, as a forward does its logits (bytes: numpy would ask for
    huge pages)."""
    return lambda: b"x" * BUFFER_BYTES


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="GLIBC_TUNABLES is glibc's")
def test_kept_freed_memory_is_not_faulted_in_again():
    result = timing.process_round_robin({"kept": (fresh_buffer_step, (), timing.KEEP_FREED_MEMORY),
                                         "default": (fresh_buffer_step, (), "")}, rounds=3, pause=0.0)
    assert result["default"][1] >= BUFFER_BYTES // (2 << 20)  # mapped anew at every call (≥ 1 fault per 2 MB)
    assert result["kept"][1] * 10 < result["default"][1]  # the heap's block from the first call is reused
