"""One writer per output folder: ``cohort run``, ``stats`` and ``report`` refuse a folder
that a live process holds, and a killed holder blocks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import StatsConfig
from cohort.outputs.lock import FolderLockedError, hold, read_holder
from cohort.synthetic import make_phantom_cohort, synthetic_results

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
# a process that takes the folder's lock the way the commands do, says so, and sleeps
HOLDER = """
import sys, time
from cohort.outputs.lock import hold
with hold(sys.argv[1], ["cohort", "run", "m.csv", "--out", sys.argv[1]]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    """A finished run's folder (no model), made without resampling to stay quick."""
    cfg = StatsConfig(bootstrap=0, permutations=0)
    return synthetic_results(tmp_path / "run", n_per_cohort=4, images=False, cfg=cfg)


def hold_folder(folder: Path) -> subprocess.Popen[str]:
    """A live process holding ``folder``'s lock (it has said so before this returns)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    return process


def names_the_holder(output: str, process: subprocess.Popen[str]) -> None:
    assert f"pid {process.pid} on host {socket.gethostname()}" in output, output
    assert "started 20" in output and "another output folder" in output, output


@pytest.mark.parametrize("executor", ["in-process", "ray"])
def test_a_run_on_a_folder_a_live_run_holds_is_refused_at_once(
    tmp_path: Path, executor: str
) -> None:
    manifest = make_phantom_cohort(tmp_path / "data", n_per_cohort=1, shape=(32, 32, 32))
    out = tmp_path / "out"
    process = hold_folder(out)
    try:
        started = time.monotonic()
        args = ["run", str(manifest), "--out", str(out), "--executor", executor]
        result = CliRunner().invoke(main, [*args, "--weights", "random", "--no-report"])
        seconds = time.monotonic() - started
    finally:
        process.kill()
        process.wait()
    assert result.exit_code == 2, result.output
    names_the_holder(result.output, process)
    assert seconds < 10, f"refused after {seconds:.1f} s, not at once"
    # before any work: nothing but the holder's lock file in the folder
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [".cohort", ".cohort/lock"]


def test_stats_on_a_folder_a_live_run_holds_is_refused(finished: Path) -> None:
    before = (finished / "stats.parquet").read_bytes(), (finished / "run.json").read_bytes()
    process = hold_folder(finished)
    try:
        result = CliRunner().invoke(main, ["stats", str(finished), "--permutations", "9"])
    finally:
        process.kill()
        process.wait()
    assert result.exit_code == 2, result.output
    names_the_holder(result.output, process)
    after = (finished / "stats.parquet").read_bytes(), (finished / "run.json").read_bytes()
    assert after == before


def test_report_into_a_folder_a_live_run_holds_is_refused(finished: Path) -> None:
    process = hold_folder(finished)
    try:
        result = CliRunner().invoke(main, ["report", str(finished)])
    finally:
        process.kill()
        process.wait()
    assert result.exit_code == 2, result.output
    names_the_holder(result.output, process)
    assert not (finished / "report").exists()


def test_a_sigkilled_holder_leaves_nothing_that_blocks(finished: Path) -> None:
    process = hold_folder(finished)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert read_holder(finished).pid == str(process.pid)  # its record is left behind ...
    result = CliRunner().invoke(main, ["stats", str(finished), "--permutations", "9"])
    assert result.exit_code == 0, result.output  # ... and blocks nothing
    assert read_holder(finished).pid == ""  # the last holder cleared it on release


def test_the_lock_holds_against_this_process_too_and_is_released(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with hold(folder, ["cohort", "stats", str(folder)]):
        assert read_holder(folder).pid == str(os.getpid())
        assert read_holder(folder).command == f"cohort stats {folder}"
        second = hold(folder, ["cohort", "stats", str(folder)])
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()} on host"):
            second.__enter__()
        (folder / "run.json").write_text("{}")
    with hold(folder, ["cohort", "stats", str(folder)]):  # released: taken again
        pass
    assert (folder / "run.json").is_file()


def test_a_folder_the_lock_made_is_removed_when_nothing_was_written(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "out"
    with hold(folder, ["cohort", "run"]):
        assert folder.is_dir()
    assert not (tmp_path / "new").exists()
