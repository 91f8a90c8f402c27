"""Progress for long runs: a bar on a terminal, a line at a steady pace elsewhere."""

from __future__ import annotations

import io

import pytest

from cohort.execution.progress import Progress, pick_mode

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_options() -> None:
    assert pick_mode(False, False, Tty()) == "bar"
    assert pick_mode(False, False, io.StringIO()) == "lines"
    assert pick_mode(True, True, Tty()) == "quiet"
    assert pick_mode(False, True, io.StringIO()) == "verbose"


def test_lines_come_at_a_steady_pace_not_per_subject() -> None:
    """100,000 subjects at 10 per second: a line when 30 s and 1 % of the subjects have
    passed since the last one, i.e. every 1,000 subjects here: 100 lines, not 100,000."""
    out, clock = io.StringIO(), Clock()
    progress = Progress(100_000, "lines", stream=out, clock=clock)
    for i in range(100_000):
        clock.now += 0.1
        progress.update(f"s{i}", "failed" if i % 1000 == 0 else "done")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 100
    assert lines[-1].startswith("[100000/100000] done 99900, reused 0, failed 100;")
    assert "10.00 subjects/s" in lines[-1] and "2:46:40 elapsed, 0:00 left" in lines[-1]
    assert lines[0].startswith("[1000/100000] done 999, reused 0, failed 1;")
    assert lines[0].endswith("1:40 elapsed, 2:45:00 left")


def test_a_slow_run_prints_every_30_s() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(20, "lines", stream=out, clock=clock)
    for i in range(20):
        clock.now += 12.0
        progress.update(f"s{i}", "cached" if i < 5 else "done")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 240 // 36  # every third subject (36 s), then the last line
    assert lines[0] == "[3/20] done 0, reused 3, failed 0; 0.08 subjects/s; 0:36 elapsed, 3:24 left"
    assert lines[-1].startswith("[20/20] done 15, reused 5, failed 0")


def test_verbose_names_each_subject_and_quiet_says_nothing() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(2, "verbose", stream=out, clock=clock)
    clock.now += 1
    progress.update("a-01", "done")
    clock.now += 1
    progress.update("a-02", "failed")
    progress.close()
    assert (
        out.getvalue().splitlines()[1].startswith("a-02: failed; [2/2] done 1, reused 0, failed 1")
    )
    silent = io.StringIO()
    quiet = Progress(2, "quiet", stream=silent, clock=clock)
    quiet.update("a", "done")
    quiet.close()
    assert silent.getvalue() == ""


def test_bar_on_a_terminal() -> None:
    out, clock = Tty(), Clock()
    progress = Progress(4, "bar", stream=out, clock=clock)
    for i in range(4):
        progress.update(f"s{i}", "done" if i else "failed")
    progress.close()
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "4/4" in text and "done 3, reused 0, failed 1" in text
