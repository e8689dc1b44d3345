"""The memory benchmarks' RSS sampler."""
from __future__ import annotations

import resource
import threading
import time


def rss_parts() -> dict[str, int]:
    """This process's resident memory now, in bytes, by kind: anonymous (its own allocations) and file-backed
    (mapped files' pages, which the kernel can drop and read again)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    return {"anon": int(fields["RssAnon"].split()[0]) * 1024, "file": int(fields["RssFile"].split()[0]) * 1024}


def ru_maxrss() -> int:
    """This process's high-water resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """This process's resident memory sampled every 5 ms in a thread (psutil), cut into segments by `mark`.

    `with RssSampler() as rss: ...; rss.mark(tensor=name)` ends a segment there; `rss.segments` is then one dict
    per mark: its info, "seconds" since the previous mark, "peak_rss" (the largest sample within it) and
    "ru_maxrss_after" (the high-water mark at its end, which grows if memory accumulates) and "after" (the resident
    memory at its end by kind, `rss_parts`). `baseline` is the RSS
    when the sampler was made (after imports and backend start, if made then)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.samples: list[tuple[float, int]] = []
        self.segments: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            time.sleep(0.005)

    def __enter__(self) -> "RssSampler":
        self.t0 = self._last = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.t0

    def mark(self, **info) -> None:
        now = time.perf_counter()
        window = [rss for t, rss in self.samples if self._last <= t <= now] or [self.process.memory_info().rss]
        self.segments.append({**info, "seconds": now - self._last, "peak_rss": max(window),
                              "ru_maxrss_after": ru_maxrss(), "after": rss_parts()})
        self._last = now

    @property
    def peak(self) -> int:
        return max([rss for _, rss in self.samples] + [self.baseline])
