"""Progress of a run, in the form that fits where it is read.

- On a terminal: one bar (tqdm) with done / reused / failed counts, the rate and
  the time left.
- Elsewhere (a Ray job log, a file, CI): one summary line at a steady pace, once
  both ``every_s`` seconds (default 30) and 1 % of the subjects (at least one)
  have passed since the last line, plus the last line: never one line per subject
  of a quick run, and at most one per 1 %, so a 100,000-subject run writes at
  most 100 lines.
- ``verbose``: a line per finished subject as well (small runs, debugging);
  ``quiet``: nothing.

The driver calls :meth:`Progress.update` once per finished subject and
:meth:`Progress.close` at the end; the clock is injectable for tests.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Final, Literal, TextIO

__all__ = ["Mode", "Progress", "pick_mode"]

Mode = Literal["bar", "lines", "verbose", "quiet"]
EVERY_S: Final = 30.0


def pick_mode(quiet: bool, verbose: bool, stream: TextIO) -> Mode:
    """``quiet`` wins, then ``verbose``; otherwise a bar on a terminal, lines elsewhere."""
    if quiet:
        return "quiet"
    if verbose:
        return "verbose"
    return "bar" if stream.isatty() else "lines"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _terminal_width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    """Counts finished subjects and reports them as ``mode`` says."""

    def __init__(
        self,
        total: int,
        mode: Mode,
        *,
        stream: TextIO | None = None,
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self.counts = {"done": 0, "cached": 0, "failed": 0}
        self._last_line = self.started
        self._last_count = 0
        self._step = max(1, total // 100)  # 1 % of the subjects
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            width = _terminal_width(self.stream)  # 0 for a pseudo-terminal of no size
            self._bar = tqdm(
                total=total,
                file=self.stream,
                unit="subject",
                ncols=None if width else 100,
                nrows=None if width else 20,  # tqdm hides bars below a 0-row terminal
                dynamic_ncols=bool(width),
                smoothing=0.1,
                desc="cohort run",
            )

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``[n/N] done d, reused c, failed f; r subjects/s; m:ss elapsed, m:ss left``."""
        elapsed = self.clock() - self.started
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.finished) / rate if rate > 0 else float("nan")
        left_text = _duration(left) if left == left else "?"
        return (
            f"[{self.finished}/{self.total}] done {self.counts['done']}, reused "
            f"{self.counts['cached']}, failed {self.counts['failed']}; {rate:.2f} subjects/s; "
            f"{_duration(elapsed)} elapsed, {left_text} left"
        )

    def update(self, subject_id: str, status: str) -> None:
        """One more subject finished with ``status`` (done, cached or failed)."""
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.mode == "quiet":
            return
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"done {self.counts['done']}, reused {self.counts['cached']}, "
                f"failed {self.counts['failed']}",
                refresh=False,
            )
            self._bar.update(1)
            return
        if self.mode == "verbose":
            self._write(f"{subject_id}: {status}; {self.summary()}")
            return
        now = self.clock()
        due = now - self._last_line >= self.every_s
        stepped = self.finished - self._last_count >= self._step
        if due and stepped:
            self._write(self.summary())
            self._last_line, self._last_count = now, self.finished

    def close(self) -> None:
        """End the bar, or write the last summary line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.finished != self._last_count:
            self._write(self.summary())
            self._last_count = self.finished

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
