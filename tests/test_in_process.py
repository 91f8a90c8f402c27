"""The in-process executor: the same stages as the Ray graph, in the driver's process.

A small local run (session.pick_executor) skips Ray's start-up; its numbers must
be the Ray run's, and it must keep the pipeline's promises: bad subjects become
error rows, a stall keeps what finished, and the loaders stay a bounded number of
subjects ahead of the model.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import IN_PROCESS_MAX_SUBJECTS, ExecutionConfig, RunConfig
from cohort.errors import ConfigError, StalledError
from cohort.execution import inprocess
from cohort.execution.session import (
    InProcess,
    pick_executor,
    plan_pool,
    usable_cpus,
)
from cohort.synthetic import make_phantom_cohort
from tests.conftest import SMALL_RUN_OPTIONS
from tests.processes import python_stdout

_TINY = (48, 64, 64)


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def _features(out: Path) -> pd.DataFrame:
    table = pd.read_parquet(out / "features.parquet")
    return table.sort_values(["subject_id", "region", "layer"]).reset_index(drop=True)


# ------------------------------------------------------------------ the choice


def _cfg(**execution: Any) -> RunConfig:
    return RunConfig(execution=ExecutionConfig(**execution))


@pytest.mark.parametrize(
    ("execution", "subjects", "environ", "connected", "expected"),
    [
        ({}, 22, {}, False, "in-process"),
        ({}, IN_PROCESS_MAX_SUBJECTS, {}, False, "in-process"),
        ({}, IN_PROCESS_MAX_SUBJECTS + 1, {}, False, "ray"),
        ({}, None, {}, False, "in-process"),  # an unreadable manifest: the plan says why
        ({"address": "auto"}, 5, {}, False, "ray"),
        ({}, 5, {"RAY_ADDRESS": "ray://head:10001"}, False, "ray"),
        ({}, 5, {}, True, "ray"),  # a Ray already connected in this process is joined
        ({"num_actors": 2}, 5, {}, False, "ray"),
        ({"executor": "ray"}, 5, {}, False, "ray"),
        ({"executor": "in-process"}, 500, {"RAY_ADDRESS": "auto"}, True, "in-process"),
    ],
)
def test_auto_runs_small_local_cohorts_in_process(
    execution: dict[str, Any],
    subjects: int | None,
    environ: dict[str, str],
    connected: bool,
    expected: str,
) -> None:
    assert pick_executor(_cfg(**execution), subjects, environ, connected) == expected


@pytest.mark.parametrize(
    ("device", "gpus", "expected"),
    [
        ("auto", 1, "in-process"),
        ("auto", 2, "ray"),  # one actor per GPU
        ("cuda", 4, "ray"),
        ("cpu", 4, "in-process"),  # the GPUs are not used
        ("auto", None, "in-process"),  # not known yet (before torch is imported)
    ],
)
def test_auto_sends_several_gpus_to_ray(device: str, gpus: int | None, expected: str) -> None:
    assert pick_executor(_cfg(device=device), 5, {}, False, gpus=gpus) == expected


@pytest.mark.parametrize("execution", [{"address": "auto"}, {"num_actors": 2}])
def test_in_process_refuses_what_needs_ray(execution: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="--executor in-process runs one model"):
        _cfg(executor="in-process", **execution)


def test_in_process_sizes_one_model_by_this_machine() -> None:
    """One model, the machine's CPUs as its torch threads, at most one GPU; CUDA asked
    for where torch sees none is refused with the fix."""
    cfg = _cfg(executor="in-process", device="auto")
    assert plan_pool(cfg, InProcess(cpus=6, gpus=0)) == (1, 0.0, 6)
    assert plan_pool(cfg, InProcess(cpus=6, gpus=4)) == (1, 1.0, None)
    with pytest.raises(ConfigError, match="no CUDA device torch can use"):
        plan_pool(_cfg(executor="in-process", device="cuda"), InProcess(cpus=6, gpus=0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("100000 100000\n", 1),
        ("50000 100000\n", 1),  # half a CPU is still one thread
        ("150000 100000\n", 2),
        ("max 100000\n", None),
        (None, None),
    ],
)
def test_usable_cpus_follow_a_container_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_max: str | None, expected: int | None
) -> None:
    """A cgroup v2 quota caps the CPUs, rounded up; without one, the process's affinity
    counts."""
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)))  # 8 CPUs
    assert usable_cpus(path) == (expected or 8)


# ------------------------------------------------------------- the same numbers


@pytest.mark.timeout(240)
def test_in_process_run_equals_the_ray_run(
    small_run: Path, small_cohort: Path, tmp_path: Path
) -> None:
    """The small cohort in this process, with one torch thread as each of the Ray run's
    two actors had, gives the Ray run's vectors exactly; it says where it ran, and
    leaves the caller's torch threads as they were."""
    out = tmp_path / "in-process"
    threads = torch.get_num_threads()
    _cli(
        *("run", str(small_cohort), "--out", str(out), *SMALL_RUN_OPTIONS, "--threads", "1"),
        *("--executor", "in-process", "--quiet", "--no-report", "--bootstrap", "200"),
    )
    assert torch.get_num_threads() == threads
    mine, theirs = _features(out), _features(small_run)
    columns = ["subject_id", "cohort", "region", "layer", "layer_name", "channels", "voxels"]
    pd.testing.assert_frame_equal(mine[columns], theirs[columns])
    for a, b in zip(mine["vector"], theirs["vector"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run = json.loads((out / "run.json").read_text())
    assert run["executor"] == "in-process" and run["ray"] is None
    assert run["in_process"]["cpus"] == usable_cpus()
    assert run["device"] == ["cpu (in-process, without Ray)"]
    assert json.loads((small_run / "run.json").read_text())["executor"] == "ray"


_FRESH = """
import json, os, sys
from pathlib import Path
os.environ.pop("RAY_ADDRESS", None)
from cohort.config import ExecutionConfig, ModelConfig, RunConfig, StatsConfig
from cohort.execution import driver

cfg = RunConfig(
    model=ModelConfig(weights="random"),
    execution=ExecutionConfig(device="cpu", progress="quiet"),
    stats=StatsConfig(bootstrap=20, permutations=9),
)
result = driver.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg, download=False)
print(json.dumps({"done": result.done, "ray": "ray" in sys.modules, "where": result.where()}))
"""


@pytest.mark.timeout(120)
def test_a_small_local_run_never_imports_ray(tmp_path: Path) -> None:
    """In a fresh interpreter, the default (auto) runs a small cohort without importing
    Ray at all: what it saves is Ray's start-up, its workers' and the actor's imports."""
    manifest = make_phantom_cohort(tmp_path / "cohort", n_per_cohort=1, shape=_TINY, seed=3)
    printed = python_stdout(_FRESH, str(manifest), str(tmp_path / "out"), timeout=110)
    outcome = json.loads(printed.strip().splitlines()[-1])
    assert outcome == {
        "done": 2,
        "ray": False,
        "where": f"in this process, without Ray ({usable_cpus()} CPUs, 0 GPUs)",
    }


# ---------------------------------------------------------- bad input, stalls


@pytest.mark.timeout(180)
def test_bad_subjects_fail_alone_in_process(tmp_path: Path) -> None:
    """A missing mask and a corrupt image become error rows naming their files; the
    others finish, and a rerun reuses them."""
    manifest = make_phantom_cohort(tmp_path / "cohort", n_per_cohort=2, shape=_TINY, seed=5)
    rows = pd.read_csv(manifest)
    missing = manifest.parent / rows.loc[0, "mask"]
    missing.unlink()
    corrupt = manifest.parent / rows.loc[1, "image"]
    corrupt.write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--weights", "random", "--quiet"]
    args += ["--executor", "in-process", "--no-report"]  # the test session's Ray is up
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert ", in this process, without Ray" in result.output
    errors = pd.read_csv(out / "errors.csv").set_index("subject_id")
    assert set(errors.index) == {rows.loc[0, "subject_id"], rows.loc[1, "subject_id"]}
    assert str(missing) in errors.loc[rows.loc[0, "subject_id"], "message"]
    assert errors.loc[rows.loc[1, "subject_id"], "stage"] == "load"
    assert set(_features(out)["subject_id"]) == set(rows["subject_id"][2:])
    again = CliRunner().invoke(main, args)
    assert "0 done, 2 reused, 2 failed of 4 subjects" in again.output, again.output


@pytest.mark.timeout(120)
def test_a_stall_in_process_keeps_what_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that hangs holds up only its subject: the others finish and are
    published, and after --stall-timeout without a finished load it is a Stalled
    error row."""
    manifest = make_phantom_cohort(tmp_path / "cohort", n_per_cohort=2, shape=_TINY, seed=7)
    ids = list(pd.read_csv(manifest)["subject_id"])
    real, real_ahead = inprocess.load_subject, inprocess._ahead
    release = threading.Event()
    waits: list[float] = []  # when the model asked the loaders for its next subject

    def hangs_on_the_second(row: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        if row["subject_id"] == ids[1]:
            release.wait(60)  # a stuck network read
        return real(row, *args, **kwargs)

    def ahead(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        loads = real_ahead(*args, **kwargs)
        while True:
            waits.append(time.monotonic())
            try:
                loaded = next(loads)
            except StopIteration:
                return
            yield loaded

    monkeypatch.setattr(inprocess, "load_subject", hangs_on_the_second)
    monkeypatch.setattr(inprocess, "_ahead", ahead)
    out = tmp_path / "out"
    try:
        args = ["run", str(manifest), "--out", str(out), "--weights", "random", "--quiet"]
        args += ["--no-report", "--executor", "in-process", "--stall-timeout", "3"]
        result = CliRunner().invoke(main, args)
        took = time.monotonic() - waits[-1]
    finally:
        release.set()
    assert result.exit_code == 1, result.output
    # from the moment nothing moved: the model had done the others and waited for a load
    assert 3 <= took <= 3 + 20, f"ended {took:.0f} s after the wait for a load began"
    assert set(_features(out)["subject_id"]) == set(ids) - {ids[1]}
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors["subject_id"]) == [ids[1]]
    assert list(errors["error_type"]) == ["Stalled"]
    assert "--stall-timeout" in errors["message"][0]


# ------------------------------------------------------------------ the loaders


@pytest.mark.timeout(60)
def test_loaders_stay_a_bounded_distance_ahead() -> None:
    """Every row comes back once, as its load finishes, and no more than AHEAD loaded
    subjects wait for a slow model."""
    rng = random.Random(0)
    lock = threading.Lock()
    loaded: list[int] = []
    taken = 0
    ahead: list[int] = []

    def load(row: dict[str, Any]) -> dict[str, Any]:
        time.sleep(rng.random() * 0.02)
        with lock:
            loaded.append(row["i"])
            ahead.append(len(loaded) - taken)
        return row

    rows = [{"i": i} for i in range(40)]
    seen = []
    for row in inprocess._ahead(load, rows):
        if not seen:  # the model holds the first subject until the other loader is done
            deadline = time.monotonic() + 30
            while len(loaded) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        seen.append(row["i"])
        with lock:
            taken += 1
        time.sleep(0.01)  # the model
    assert sorted(seen) == list(range(40))
    # a loader may take the slot the model frees before the model's count moves on
    assert max(ahead) <= inprocess.AHEAD + 1
    assert sorted(loaded) == list(range(40))
    assert max(ahead) > 1  # the loaders did run ahead of the model


@pytest.mark.timeout(60)
def test_loaders_end_when_the_model_stops_early_or_a_load_raises() -> None:
    """Closing the stream early ends the loader threads; an exception a load raises
    (a bug: load_subject makes rows of errors) reaches the consumer."""
    before = {t.name for t in threading.enumerate()}

    def load(row: dict[str, Any]) -> dict[str, Any]:
        if row["i"] == 5:
            raise RuntimeError("a bug in loading")
        time.sleep(0.01)
        return row

    rows = [{"i": i} for i in range(10)]
    stream = inprocess._ahead(load, rows)
    next(stream)
    stream.close()
    with pytest.raises(RuntimeError, match="a bug in loading"):
        list(inprocess._ahead(load, rows))
    deadline = time.monotonic() + 10
    while {t.name for t in threading.enumerate()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {t.name for t in threading.enumerate()} - before


@pytest.mark.timeout(60)
def test_a_pending_load_longer_than_the_timeout_is_a_stall() -> None:
    release = threading.Event()

    def load(row: dict[str, Any]) -> dict[str, Any]:
        if row["i"] == 0:
            release.wait(30)
        return row

    got: list[int] = []

    def consume() -> None:
        for row in inprocess._ahead(load, [{"i": i} for i in range(4)], timeout=1.0):
            got.append(row["i"])

    try:
        with pytest.raises(StalledError, match="--stall-timeout"):
            consume()
    finally:
        release.set()
    assert sorted(got) == [1, 2, 3]  # the others came through first
