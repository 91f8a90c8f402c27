"""Progress of a real ``cohort run``: a bar on a terminal, summary lines in a log."""

from __future__ import annotations

import itertools
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def run_cohort(manifest: Path, out: Path, *, terminal: bool) -> str:
    """``cohort run`` in a subprocess with stderr on a pseudo-terminal or a pipe."""
    command = [sys.executable, "-m", "cohort", "run", str(manifest), "--out", str(out)]
    command += ["--weights", "random", "--device", "cpu", "--no-report", "--bootstrap", "0"]
    command += ["--permutations", "0", "--stall-timeout", "240"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    env.update(RAY_AUTH_MODE="token", COLUMNS="100")
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=360)
        assert done.returncode == 0, done.stderr
        return done.stderr
    main, follower = pty.openpty()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other end closed: the run is over
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=360) == 0, b"".join(chunks)[-3000:]
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_a_bar_on_a_terminal_and_summary_lines_in_a_log(small_cohort: Path, tmp_path: Path) -> None:
    on_terminal = run_cohort(small_cohort, tmp_path / "tty", terminal=True)
    assert "\r" in on_terminal  # redrawn in place
    assert re.search(r"cohort run: +100%.*6/6", on_terminal), on_terminal[-2000:]
    assert "done 6, reused 0, failed 0" in on_terminal
    assert "[6/6]" not in on_terminal  # no summary lines on a terminal

    in_a_log = run_cohort(small_cohort, tmp_path / "log", terminal=False)
    lines = [x for x in in_a_log.splitlines() if x.startswith("[")]
    assert lines, in_a_log[-2000:]
    assert re.fullmatch(
        r"\[6/6\] done 6, reused 0, failed 0; [0-9.]+ subjects/s; \d+:\d\d elapsed, 0:00 left",
        lines[-1],
    )
    # the README's pace: a line only once 30 s and 1 % of the subjects have passed since
    # the last one, then the last line. Six subjects take a few seconds each, so a line
    # per subject (or per finished load) breaks this
    counts = [int(re.match(r"\[(\d+)/6\]", line).group(1)) for line in lines]  # type: ignore[union-attr]
    elapsed = [_seconds(re.search(r"(\d+):(\d\d) elapsed", line)) for line in lines]
    assert counts == sorted(set(counts))  # each line a step further
    for before, after in itertools.pairwise([0, *elapsed[:-1]]):
        assert after - before >= 30 - 1, lines  # (m:ss rounds each to the second)
    assert len(lines) <= 1 + elapsed[-1] // 30, lines
    assert "\r" not in in_a_log


def _seconds(match: re.Match[str] | None) -> int:
    assert match is not None
    return 60 * int(match.group(1)) + int(match.group(2))
