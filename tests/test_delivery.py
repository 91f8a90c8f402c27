"""Nothing silently dropped, nothing counted twice: what the driver does with the stream.

The driver checks, before it writes anything, that results plus error rows cover
the manifest exactly, each subject once (:func:`cohort.execution.driver.add_lost`).
The pure tests below hold that check to its rows; the end-to-end ones disturb the
stream of a real in-process run between the stages and the driver (a subject never
returned, the graph failing mid-run, every result delivered twice) and read what
the run wrote.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from cohort.cli.main import main
from cohort.errors import CohortError, StalledError
from cohort.execution import driver
from cohort.inputs.manifest import Subject, read_manifest
from cohort.synthetic import make_phantom_cohort

pytestmark = pytest.mark.timeout(300)

SHAPE = (32, 64, 64)  # DenseNet121's block 4 sees a 1x2x2 grid
KEY = ["subject_id", "region", "layer"]
Rows = Iterator[dict[str, Any]]


def subjects(*ids: str) -> list[Subject]:
    return [Subject(i, Path(f"/data/{i}.nii.gz"), Path(f"/data/{i}_seg.nii.gz"), "c", None, n)
            for n, i in enumerate(ids, 1)]  # fmt: skip


# ----------------------------------------------------------- the coverage check


def test_a_subject_the_stream_never_returned_becomes_a_lost_row() -> None:
    result = driver.RunResult(Path("out"), subjects=3)
    driver.add_lost(subjects("a", "b", "c"), {"a", "c"}, result, None)
    assert result.failed == 1
    (row,) = result.errors
    assert (row["subject_id"], row["stage"], row["error_type"]) == ("b", "pipeline", "Lost")
    assert "returned no result for this subject" in row["message"]
    assert "rerun the same command" in row["message"]
    assert row["image"] == "/data/b.nii.gz" and row["mask"] == "/data/b_seg.nii.gz"


def test_a_failed_graph_names_its_cause_in_every_lost_row() -> None:
    result = driver.RunResult(Path("out"), subjects=4)
    cause = RuntimeError("the node running the actors died\n(a traceback follows)")
    driver.add_lost(subjects("a", "b", "c", "d"), {"a"}, result, cause)
    assert [e["subject_id"] for e in result.errors] == ["b", "c", "d"]
    assert result.failed == 3
    for row in result.errors:
        assert row["error_type"] == "Lost" and row["stage"] == "pipeline"
        assert "stopped before this subject finished (RuntimeError: the node running the " \
            "actors died)" in row["message"]  # fmt: skip


def test_a_stall_makes_stalled_rows() -> None:
    result = driver.RunResult(Path("out"), subjects=2)
    stall = StalledError("nothing moved for 40 s (--stall-timeout)")
    driver.add_lost(subjects("a", "b"), {"a"}, result, stall)
    (row,) = result.errors
    assert (row["subject_id"], row["error_type"]) == ("b", "Stalled")
    assert row["message"].startswith("nothing moved for 40 s (--stall-timeout); this subject")


def test_a_subject_failed_and_returned_is_fine_but_twice_is_refused() -> None:
    result = driver.RunResult(Path("out"), subjects=2)
    failed = {"subject_id": "b", "stage": "load", "error_type": "X", "message": "m"}
    result.errors.append(failed)
    result.failed = 1
    driver.add_lost(subjects("a", "b"), {"a", "b"}, result, None)
    assert result.errors == [failed]  # nothing added: every subject is accounted for
    result.errors.append(dict(failed))
    result.failed = 2
    with pytest.raises(CohortError, match="error rows repeat a subject"):
        driver.add_lost(subjects("a", "b"), {"a", "b"}, result, None)


def test_a_result_for_a_subject_outside_the_manifest_is_refused() -> None:
    result = driver.RunResult(Path("out"), subjects=1)
    with pytest.raises(CohortError, match="do not cover the manifest"):
        driver.add_lost(subjects("a"), {"a", "stranger"}, result, None)


# ------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four good phantom subjects in two cohorts; returns the manifest."""
    return make_phantom_cohort(
        tmp_path_factory.mktemp("four"), n_per_cohort=2, shape=SHAPE, seed=31
    )


def run_with(
    manifest: Path, out: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Rows], Rows]
) -> tuple[Result, list[dict[str, Any]]]:
    """An in-process ``cohort run`` whose result rows pass through ``change`` on their
    way to the driver; returns the CLI's result and every row the stages produced."""
    produced: list[dict[str, Any]] = []
    real = driver._stream

    def stream(*args: Any, **kwargs: Any) -> Generator[dict[str, Any], None, None]:
        rows = real(*args, **kwargs)

        def recorded() -> Rows:
            for row in rows:
                produced.append(row)
                yield row

        try:
            yield from change(recorded())
        finally:
            rows.close()

    monkeypatch.setattr(driver, "_stream", stream)
    args = ["run", str(manifest), "--out", str(out), "--weights", "random", "--device", "cpu"]
    args += ["--quiet", "--no-report", "--executor", "in-process", "--bootstrap", "20"]
    args += ["--permutations", "9"]
    return CliRunner().invoke(main, args), produced


def vectors_of(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The pooled vectors the stages delivered in ``rows`` (done rows only)."""
    records = [
        {"subject_id": str(row["subject_id"]), "region": v.region, "layer": v.layer,
         "vector": v.vector}
        for row in rows if row["status"] == "done"
        for v, _ in pickle.loads(row["features"])
    ]  # fmt: skip
    return pd.DataFrame(records).sort_values(KEY).reset_index(drop=True)


def written(out: Path) -> pd.DataFrame:
    table = pd.read_parquet(out / "features.parquet")
    return table.sort_values(KEY).reset_index(drop=True)


def assert_written_as_delivered(out: Path, rows: list[dict[str, Any]], ids: set[str]) -> None:
    """``out`` holds exactly ``ids``, once each, with the vectors the stages made."""
    got, made = written(out), vectors_of(rows)
    made = made[made.subject_id.isin(ids)].reset_index(drop=True)
    assert set(got.subject_id) == ids
    assert not got.duplicated(KEY).any()
    assert len(got) == len(made) == 9 * len(ids)  # 3 regions x 3 layers
    np.testing.assert_array_equal(got[KEY].to_numpy(), made[KEY].to_numpy())
    np.testing.assert_array_equal(np.stack(list(got.vector)), np.stack(list(made.vector)))


def counts(out: Path) -> dict[str, int]:
    return dict(json.loads((out / "run.json").read_text())["counts"])


def test_a_subject_the_stream_never_returns_is_a_lost_row(
    four: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [s.subject_id for s in read_manifest(four)]
    victim = ids[1]

    def drop(rows: Rows) -> Rows:
        return (row for row in rows if row["subject_id"] != victim)

    out = tmp_path / "out"
    result, produced = run_with(four, out, monkeypatch, drop)

    assert result.exit_code == 1, result.output
    assert {str(row["subject_id"]) for row in produced} == set(ids)  # the stages did it all
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.subject_id) == [victim]
    assert (errors.stage[0], errors.error_type[0]) == ("pipeline", "Lost")
    assert "the pipeline returned no result for this subject" in errors.message[0]
    assert_written_as_delivered(out, produced, set(ids) - {victim})
    assert counts(out) == {"subjects": 4, "done": 3, "cached": 0, "failed": 1}
    assert f"failed {victim} at pipeline" in result.output


def test_when_the_graph_fails_the_finished_are_written_and_the_rest_lost(
    four: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_after_two(rows: Rows) -> Rows:
        for n, row in enumerate(rows):
            yield row
            if n == 1:
                raise RuntimeError("the raylet of the actors' node died (injected)")

    out = tmp_path / "out"
    result, produced = run_with(four, out, monkeypatch, fail_after_two)

    assert result.exit_code == 1, result.output
    finished = {str(row["subject_id"]) for row in produced[:2]}
    lost = {s.subject_id for s in read_manifest(four)} - finished
    assert len(finished) == 2 and len(lost) == 2
    errors = pd.read_csv(out / "errors.csv")
    assert set(errors.subject_id) == lost and len(errors) == 2
    assert set(errors.stage) == {"pipeline"} and set(errors.error_type) == {"Lost"}
    cause = "(RuntimeError: the raylet of the actors' node died (injected))"
    assert errors.message.str.contains(cause, regex=False).all()
    assert_written_as_delivered(out, produced, finished)
    assert counts(out) == {"subjects": 4, "done": 2, "cached": 0, "failed": 2}


def test_a_result_delivered_twice_counts_once(
    four: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row arrives twice, the second time as a different outcome (a retried
    task that failed after the first had delivered): the first delivery counts, once,
    for the subjects that finished and for the one that failed."""
    data = Path(shutil.copytree(four.parent, tmp_path / "data"))
    subjects = read_manifest(data / four.name)
    subjects[2].mask.unlink()
    bad = subjects[2].subject_id

    def twice(rows: Rows) -> Rows:
        for row in rows:
            yield row
            again = dict(row, status="failed", stage="extract", error_type="WorkerDied")
            yield dict(again, message="a second delivery", features=b"")

    out = tmp_path / "out"
    result, produced = run_with(data / four.name, out, monkeypatch, twice)

    assert result.exit_code == 1, result.output
    assert len(produced) == 4
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.subject_id) == [bad]
    assert (errors.stage[0], errors.error_type[0]) == ("load", "FileNotFoundError")
    assert subjects[2].mask.name in errors.message[0]
    good = {s.subject_id for s in subjects} - {bad}
    assert_written_as_delivered(out, produced, good)
    assert counts(out) == {"subjects": 4, "done": 3, "cached": 0, "failed": 1}
    assert "3 done, 0 reused, 1 failed of 4 subjects" in result.output
