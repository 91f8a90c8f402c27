"""Measuring tools: the matmul ceiling, model FLOPs, timings and peak memory."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Timing:
    """Wall seconds of repeated calls: best, median and worst."""

    best: float
    median: float
    worst: float

    @property
    def spread(self) -> float:
        """(worst - best) / best: how noisy the repeats were."""
        return (self.worst - self.best) / self.best if self.best > 0 else 0.0


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return Timing(min(seconds), statistics.median(seconds), max(seconds))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> Timing:
    """fp32 ``torch.mm`` rate of this process's threads in GFLOP/s.

    The fields are rates, so ``best`` is the highest (the ceiling) and ``worst`` the lowest.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_calls(lambda: torch.mm(a, b), repeats)
    flop = 2.0 * n**3 / 1e9
    return Timing(flop / t.best, flop / t.median, flop / t.worst)


def count_gflop(fn: Callable[[], object]) -> float:
    """Model FLOPs of one call (torch's flop counter: convolutions and matmuls), GFLOP."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB.

    /proc's VmHWM first: Linux keeps ``ru_maxrss`` across fork and execve, so a
    child started by a big parent would report the parent's peak.
    """
    kib = _status_kib(os.getpid(), "VmHWM")
    if kib is None:
        kib = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return kib / 1024.0


def _unique_kib(pid: int) -> float | None:
    """A process's private pages (clean and dirty), KiB, from /proc/PID/smaps_rollup."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    return float(sum(int(x.split()[1]) for x in lines if x.startswith("Private_")))


def _status_kib(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class ProcessPeak:
    """Samples the peak RSS (VmHWM) of processes whose command line contains ``needle``,
    or with ``unique=True`` the largest unique memory seen (private pages, what Ray
    Data's memory warning compares with an actor's request; sampled, so a lower bound).

    Ray names an actor's process after its class (``ray::MapWorker(...FeatureActor)``),
    so this finds the feature actors without asking Ray. Linux only; 0 elsewhere.
    """

    def __init__(self, needle: str, interval: float = 0.5, *, unique: bool = False) -> None:
        self.needle = needle.encode()
        self.interval = interval
        self.unique = unique
        self.peak_kib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ProcessPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        proc = Path("/proc")
        if not proc.is_dir():
            return
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if self.needle in cmdline:
                pid = int(entry.name)
                kib = _unique_kib(pid) if self.unique else _status_kib(pid, "VmHWM")
                if kib is not None:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0.0), kib)

    @property
    def peak_mib(self) -> float:
        """The largest peak of any one matching process, MiB."""
        return max(self.peak_kib.values(), default=0.0) / 1024.0
