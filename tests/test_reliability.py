"""Nothing lost: bad inputs isolated, workers killed mid-run, interrupted runs resumed.

One module-scoped cohort of ten good phantom subjects and one clean run of it
(the reference) are shared by the tests below: every disturbed run must end
with exactly the reference's vectors for the subjects it finished.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result

from cohort.cli.main import main
from cohort.config import (
    ExecutionConfig,
    ModelConfig,
    RunConfig,
    format_label_map,
)
from cohort.errors import CohortError, WeightsError
from cohort.execution import extract as extraction
from cohort.execution import load as loading
from cohort.inputs.manifest import Subject, read_manifest, write_manifest
from cohort.model.network import load_weights
from cohort.outputs import store
from cohort.synthetic import make_phantom_cohort
from tests.processes import cluster_script, interruptible

Patch = pytest.MonkeyPatch
SHAPE = (32, 64, 64)  # (D, H, W): DenseNet121's block 4 sees a 1x2x2 grid; ~1 s a subject
FAST = [
    "--device", "cpu", "--actors", "1", "--weights", "random", "--stall-timeout", "240",
    "--bootstrap", "200", "--permutations", "99", "--no-report",
]  # fmt: skip
KEY = ["subject_id", "region", "layer"]
PAIR = ["subject_id", "layer", "region_a", "region_b"]


def cohort_run(manifest: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(
        main, ["run", str(manifest), "--out", str(out), "--quiet", *FAST, *extra]
    )


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def features(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "features.parquet").to_pandas().sort_values(KEY)


def similarity(out: Path) -> pd.DataFrame:
    return pq.read_table(out / "similarity.parquet").to_pandas().sort_values(PAIR)


def assert_same_results(
    out: Path, reference: Path, subjects: set[str], others: frozenset[str] = frozenset()
) -> None:
    """``out`` holds exactly ``subjects`` (and ``others``, not compared), once each,
    with the reference's numbers."""
    got, ref = features(out), features(reference)
    assert set(got.subject_id) == subjects | others
    assert not got.duplicated(KEY).any()
    got, ref = got[got.subject_id.isin(subjects)], ref[ref.subject_id.isin(subjects)]
    assert len(got) == len(ref) == 9 * len(subjects)  # 3 regions x 3 layers
    if not subjects:
        return
    np.testing.assert_array_equal(got[KEY].to_numpy(), ref[KEY].to_numpy())
    np.testing.assert_array_equal(got.voxels.to_numpy(), ref.voxels.to_numpy())
    np.testing.assert_array_equal(np.stack(got.vector), np.stack(ref.vector))
    got_sim, ref_sim = similarity(out), similarity(reference)
    assert not got_sim.duplicated(PAIR).any()
    got_sim = got_sim[got_sim.subject_id.isin(subjects)]
    ref_sim = ref_sim[ref_sim.subject_id.isin(subjects)]
    np.testing.assert_array_equal(got_sim[PAIR].to_numpy(), ref_sim[PAIR].to_numpy())
    np.testing.assert_array_equal(got_sim.cosine.to_numpy(), ref_sim.cosine.to_numpy())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten good phantom subjects in two cohorts; returns the manifest."""
    folder = tmp_path_factory.mktemp("good")
    return make_phantom_cohort(folder, n_per_cohort=5, shape=SHAPE, seed=23)


@pytest.fixture(scope="module")
def four(good: Path) -> list[Subject]:
    """The first four good subjects."""
    return list(read_manifest(good))[:4]


@pytest.fixture(scope="module")
def good_ids(good: Path) -> set[str]:
    return {s.subject_id for s in read_manifest(good)}


@pytest.fixture(scope="module")
def reference(ray_session: None, good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean, undisturbed run of the good subjects alone."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = cohort_run(good, out)
    assert result.exit_code == 0, result.output
    assert run_json(out)["counts"] == {"subjects": 10, "done": 10, "cached": 0, "failed": 0}
    return out


# ------------------------------------------------------------------ bad inputs


@dataclass(frozen=True)
class Bad:
    """One broken subject and what errors.csv must say about it."""

    subject_id: str
    image: Path
    mask: Path
    stage: str
    error_type: str
    names: str  # file name the message must contain
    fix: str  # regex of the next step the message must give


def make_bad_inputs(folder: Path, template: Subject) -> list[Bad]:
    """One subject per kind of bad input, built from a good phantom subject."""
    folder.mkdir(parents=True, exist_ok=True)
    image_img, mask_img = nib.load(template.image), nib.load(template.mask)
    hu = np.asarray(image_img.dataobj).astype(np.int16)
    labels = np.asarray(mask_img.dataobj).astype(np.uint8)
    affine = image_img.affine
    good_image, good_mask = template.image, template.mask

    def save(name: str, data: np.ndarray, aff: np.ndarray = affine) -> Path:
        img = nib.Nifti1Image(data, aff)
        img.header.set_data_dtype(data.dtype)
        nib.save(img, folder / name)
        return folder / name

    junk = folder / "junk.nii.gz"
    junk.write_bytes(bytes(range(256)) * 64)
    truncated = folder / "truncated.nii.gz"
    whole = good_image.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    soft = labels.astype(np.float32)
    soft[0, 0, 0] = 0.5
    tiny = np.where(labels == 1, 0, labels).astype(np.uint8)
    tiny[tuple(np.argwhere(labels == 1)[0])] = 1  # the tibia is one voxel
    nan = hu.astype(np.float32)
    nan[3, 4, 5] = np.nan
    inf = hu.astype(np.float32)
    inf[5, 4, 3] = np.inf
    absurd = folder / "absurd.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))  # 8.6e9 voxels; the file holds none
    header.set_data_dtype(np.int16)
    header.set_sform(affine, code=1)
    absurd.write_bytes(header.binaryblock + b"\0" * 4)

    return [
        Bad("missing", folder / "absent.nii.gz", good_mask, "load", "FileNotFoundError",
            "absent.nii.gz", "fix the path"),
        Bad("not-nifti", junk, good_mask, "load", "InputError", "junk.nii.gz", "convert it"),
        Bad("truncated-gzip", truncated, good_mask, "load", "InputError", "truncated.nii.gz",
            "copy or export it again"),
        Bad("shape-mismatch", good_image, save("short.nii.gz", labels[:, :, :-1]), "check",
            "GeometryError", "short.nii.gz", "resample the mask"),
        Bad("affine-mismatch", good_image, save("shifted.nii.gz", labels, shifted), "check",
            "GeometryError", "shifted.nii.gz", "resample the mask"),
        Bad("non-integer-mask", good_image, save("soft.nii.gz", soft), "load", "InputError",
            "soft.nii.gz", "integer type"),
        Bad("label-absent", good_image, save("no-femur.nii.gz", np.where(labels == 2, 0, labels)
            .astype(np.uint8)), "check", "RegionError", "no-femur.nii.gz", "`labels` map"),
        Bad("region-too-small", good_image, save("tiny.nii.gz", tiny), "extract", "RegionError",
            "tiny.nii.gz", "hook a shallower layer"),
        Bad("no-background", good_image, save("all-bone.nii.gz", np.where(labels == 2, 2, 1)
            .astype(np.uint8)), "preprocess", "RegionError", "all-bone.nii.gz", "label map"),
        Bad("nan-voxel", save("nan.nii.gz", nan), good_mask, "check", "InputError", "nan.nii.gz",
            "replace them"),
        Bad("inf-voxel", save("inf.nii.gz", inf), good_mask, "check", "InputError", "inf.nii.gz",
            "replace them"),
        Bad("image-2d", save("slice.nii.gz", hu[:, :, 7]), good_mask, "load", "GeometryError",
            "slice.nii.gz", "stack the slices"),
        Bad("image-4d", save("series.nii.gz", np.stack([hu, hu], axis=-1)), good_mask, "load",
            "GeometryError", "series.nii.gz", "split the series"),
        Bad("absurd-size", absurd, good_mask, "load", "InputError", "absurd.nii",
            "raise the limit"),
    ]  # fmt: skip


@pytest.mark.timeout(600)
def test_mixed_cohort_isolates_every_bad_input(
    ray_session: None, good: Path, good_ids: set[str], reference: Path, tmp_path: Path
) -> None:
    """10 good + one of each bad input: exit 1, the good ones exactly as in a clean run,
    each bad one in errors.csv with its stage and a message naming the file and the fix."""
    subjects = list(read_manifest(good))
    bad = make_bad_inputs(tmp_path / "bad", subjects[0])
    mixed: list[Subject] = []
    for i in range(max(len(subjects), len(bad))):  # interleaved, bad ones in good cohorts
        mixed.extend(subjects[i : i + 1])
        for case in bad[i : i + 1]:
            cohort = subjects[i % len(subjects)].cohort
            mixed.append(Subject(case.subject_id, case.image, case.mask, cohort, None, 0))
    manifest = write_manifest(mixed, tmp_path / "mixed.csv")
    assert len(read_manifest(manifest)) == 10 + len(bad)
    out = tmp_path / "out"

    result = cohort_run(manifest, out)

    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv", keep_default_na=False).set_index("subject_id")
    assert sorted(errors.index) == sorted(case.subject_id for case in bad)
    for case in bad:
        row = errors.loc[case.subject_id]
        context = f"{case.subject_id}: {row.to_dict()}"
        assert (row.stage, row.error_type) == (case.stage, case.error_type), context
        assert case.names in row.message, context
        assert re.search(case.fix, row.message), context
        assert "unexpected error" not in row.message, context
    assert_same_results(out, reference, good_ids)
    for name in ("similarity.csv", "stats.csv"):  # summaries see only the good subjects
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    counts = run_json(out)["counts"]
    assert counts == {"subjects": 10 + len(bad), "done": 10, "cached": 0, "failed": len(bad)}
    assert set(pq.read_table(out / "errors.parquet").column("subject_id").to_pylist()) == set(
        errors.index
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("subject_id,image,mask\na,a.nii,am.nii\na,b.nii,bm.nii\n", "appears in row 1 and again"),
        ("subject_id,image,mask\na,,am.nii\n", "column 'image' is blank"),
        ("subject_id,image,mask,age\na,a.nii,am.nii,40\n", "unknown column"),
    ],
    ids=["duplicate-ids", "blank-cell", "unknown-column"],
)
def test_unusable_manifest_exits_2_before_any_work(tmp_path: Path, text: str, says: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(text)
    result = cohort_run(manifest, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert says in result.output and str(manifest) in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- worker faults


@pytest.mark.timeout(600)
def test_killed_actor_is_restarted_and_its_subject_retried(
    ray_session: None, four: list[Subject], reference: Path, tmp_path: Path, monkeypatch: Patch
) -> None:
    subset, manifest = four, write_manifest(four, tmp_path / "four.csv")
    victim = subset[1].subject_id
    marker = tmp_path / "killed"
    monkeypatch.setenv(extraction.FAULT_SUBJECT_ENV, victim)
    monkeypatch.setenv(extraction.FAULT_MARKER_ENV, str(marker))
    out = tmp_path / "out"

    result = cohort_run(manifest, out, "--retries", "2")

    assert result.exit_code == 0, result.output
    assert marker.is_file(), "the fault hook never fired"
    pid = int(re.search(r"killed pid (\d+)", marker.read_text()).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that actor process is gone: the subject ran on a restarted one
    assert_same_results(out, reference, {s.subject_id for s in subset})
    assert run_json(out)["counts"] == {"subjects": 4, "done": 4, "cached": 0, "failed": 0}
    assert pd.read_csv(out / "errors.csv").empty


@pytest.mark.timeout(600)
def test_worker_death_beyond_the_retries_fails_that_subject_alone(
    ray_session: None, four: list[Subject], reference: Path, tmp_path: Path, monkeypatch: Patch
) -> None:
    """--retries 0 and one death: that subject is an error row naming the death; the
    others are done with the reference's vectors."""
    subset = four[:3]
    manifest = write_manifest(subset, tmp_path / "three.csv")
    victim = subset[1].subject_id
    monkeypatch.setenv(extraction.FAULT_SUBJECT_ENV, victim)
    monkeypatch.setenv(extraction.FAULT_MARKER_ENV, str(tmp_path / "killed"))
    out = tmp_path / "out"

    result = cohort_run(manifest, out, "--retries", "0")

    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv").set_index("subject_id")
    assert list(errors.index) == [victim]
    assert errors.loc[victim, "stage"] == "extract"
    assert errors.loc[victim, "error_type"] == "WorkerDied"
    assert "died once" in errors.loc[victim, "message"]
    others = {s.subject_id for s in subset} - {victim}
    assert_same_results(out, reference, others)
    assert run_json(out)["counts"] == {"subjects": 3, "done": 2, "cached": 0, "failed": 1}


@pytest.mark.timeout(600)
def test_a_subject_that_kills_its_worker_every_time_fails_alone(
    ray_session: None,
    good: Path,
    good_ids: set[str],
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poison subject: its worker dies on every attempt. After --retries (2) retries
    it becomes its error row; the run does not stop early and the nine others are done
    with the vectors of a clean run."""
    subjects = list(read_manifest(good))
    victim = subjects[4].subject_id  # in the middle: subjects after it must still run
    monkeypatch.setenv(extraction.FAULT_SUBJECT_ENV, victim)
    monkeypatch.setenv(extraction.FAULT_MARKER_ENV, str(tmp_path / "killed"))
    monkeypatch.setenv(extraction.FAULT_MODE_ENV, "always")
    out = tmp_path / "out"

    result = cohort_run(good, out)

    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv").set_index("subject_id")
    assert list(errors.index) == [victim]
    row = errors.loc[victim]
    assert (row["stage"], row["error_type"]) == ("extract", "WorkerDied")
    assert f"died 3 times on subject {victim}" in row["message"]
    assert "--actor-memory" in row["message"]
    assert_same_results(out, reference, good_ids - {victim})
    assert run_json(out)["counts"] == {"subjects": 10, "done": 9, "cached": 0, "failed": 1}


@pytest.mark.timeout(600)
def test_a_lost_node_loses_nothing(
    ray_session: None, good: Path, good_ids: set[str], reference: Path, tmp_path: Path
) -> None:
    """A two-node cluster (tests/node_loss_run.py) loses the node that runs every loader
    and actor in the middle of the run (the last subject is held up by the test hook
    until then, and again for as long after it restarts); every subject ends exactly
    once, with the vectors of an undisturbed run."""
    out = tmp_path / "out"
    fault = {
        extraction.FAULT_SUBJECT_ENV: list(read_manifest(good))[-1].subject_id,
        extraction.FAULT_MARKER_ENV: str(tmp_path / "hung"),
        extraction.FAULT_MODE_ENV: "hang:10",
    }
    events = cluster_script("node_loss_run.py", "NODE-LOSS", str(good), str(out), env=fault)
    print(events)
    assert 2 <= events["parts_when_killed"] < 10  # killed mid-run
    assert (events["done"], events["failed"]) == (10, 0), events
    got = features(out)
    assert len(got) == 9 * 10 and not got.duplicated(KEY).any()
    ref = features(reference)
    np.testing.assert_array_equal(got[KEY].to_numpy(), ref[KEY].to_numpy())
    # another process with other thread counts: equal to float32 rounding
    np.testing.assert_allclose(np.stack(got.vector), np.stack(ref.vector), rtol=1e-5, atol=1e-6)
    assert run_json(out)["counts"] == {"subjects": 10, "done": 10, "cached": 0, "failed": 0}


def test_fault_hook_needs_a_marker() -> None:
    assert extraction.FaultHook.from_env({}) is None
    with pytest.raises(CohortError, match=extraction.FAULT_MARKER_ENV):
        extraction.FaultHook.from_env({extraction.FAULT_SUBJECT_ENV: "a"})


def _row(subject: Subject) -> dict[str, str]:
    return {
        "subject_id": subject.subject_id,
        "cohort": subject.cohort,
        "image": str(subject.image),
        "mask": str(subject.mask),
        "labels": format_label_map(RunConfig().regions.labels),
    }


@pytest.mark.parametrize(("failures", "status"), [(2, "ready"), (3, "failed")])
def test_transient_io_error_is_retried_a_bounded_number_of_times(
    good: Path, monkeypatch: pytest.MonkeyPatch, failures: int, status: str
) -> None:
    """EIO while reading: retried max_retries (2) times; a third failure is an error row."""
    subject = read_manifest(good)[0]
    real_read = loading.read_file  # each file is read once, for its hash and its voxels
    calls: list[Path] = []

    def flaky(path: Path) -> bytes:
        calls.append(Path(path))
        if len(calls) <= failures:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path)

    monkeypatch.setattr(loading, "read_file", flaky)
    monkeypatch.setattr(loading, "IO_RETRY_DELAY_S", 0.0)
    cfg = RunConfig(execution=ExecutionConfig(max_retries=2))
    out = loading.load_subject(_row(subject), cfg, "identity", frozenset())
    assert out["status"] == status, out["message"]
    if status == "failed":
        assert len(calls) == 3
        assert out["stage"] == "load"
        assert subject.image.name in out["message"] and "after 3 attempts" in out["message"]
    else:
        assert len(calls) == failures + 2  # image fails twice, then image and mask open


def test_corrupt_file_is_not_retried(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = read_manifest(good)[0]
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not gzip at all" * 100)
    real_read = loading.read_file
    calls: list[Path] = []

    def counting(path: Path) -> bytes:
        calls.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(loading, "read_file", counting)
    row = {**_row(subject), "image": str(junk)}
    out = loading.load_subject(row, RunConfig(), "identity", frozenset())
    assert (out["status"], out["stage"]) == ("failed", "load")
    assert calls.count(junk) == 1  # read once, not retried


def test_transient_retries_back_off_doubling(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's doubling backoff, on a fake clock: 0.5 s, then 1 s, then 2 s."""
    subject = read_manifest(good)[0]
    slept: list[float] = []
    monkeypatch.setattr(loading.time, "sleep", slept.append)

    def always_eio(path: Path) -> bytes:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(loading, "read_file", always_eio)
    cfg = RunConfig(execution=ExecutionConfig(max_retries=3))
    out = loading.load_subject(_row(subject), cfg, "identity", frozenset())
    assert out["status"] == "failed" and "after 4 attempts" in out["message"]
    assert slept == [0.5, 1.0, 2.0]
    assert loading.IO_RETRY_DELAY_S == 0.5


def test_transient_error_while_hashing_is_retried(
    good: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO while computing the resume key's file hashes: retried like a read."""
    subject = read_manifest(good)[0]
    real_read = loading.read_file  # the bytes the hash is computed from
    calls: list[Path] = []

    def flaky(path: Path) -> bytes:
        calls.append(Path(path))
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path)

    monkeypatch.setattr(loading, "read_file", flaky)
    monkeypatch.setattr(loading.time, "sleep", lambda _: None)
    out = loading.load_subject(_row(subject), RunConfig(), "identity", frozenset())
    assert out["status"] == "ready", out["message"]
    assert calls[:3] == [subject.image] * 3  # the image's hash failed twice, then worked


def test_permission_error_is_not_retried(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subject = read_manifest(good)[0]
    calls: list[Path] = []

    def denied(path: Path) -> bytes:
        calls.append(Path(path))
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(loading, "read_file", denied)
    monkeypatch.setattr(loading.time, "sleep", lambda _: pytest.fail("slept before a retry"))
    out = loading.load_subject(_row(subject), RunConfig(), "identity", frozenset())
    assert (out["status"], out["stage"], len(calls)) == ("failed", "load", 1)
    assert "Permission denied" in out["message"] and "attempts" not in out["message"]


@pytest.mark.timeout(600)
def test_a_stalled_run_keeps_what_finished_and_names_the_stall(
    ray_session: None, four: list[Subject], reference: Path, tmp_path: Path, monkeypatch: Patch
) -> None:
    """--stall-timeout: a hung worker stops the run within the timeout (+ 20 s) of the
    hang; the finished subjects are written, the others are error rows of type Stalled,
    and the exit status is 1."""
    subset, manifest = four, write_manifest(four, tmp_path / "four.csv")
    victim = subset[-1].subject_id
    hung = tmp_path / "hung"
    monkeypatch.setenv(extraction.FAULT_SUBJECT_ENV, victim)
    monkeypatch.setenv(extraction.FAULT_MARKER_ENV, str(hung))
    monkeypatch.setenv(extraction.FAULT_MODE_ENV, "hang:150")  # far beyond 40 + 20 s
    out = tmp_path / "out"

    result = cohort_run(manifest, out, "--stall-timeout", "40")
    ended = time.time()

    assert result.exit_code == 1, result.output
    assert hung.exists()  # the hook fired: the worker hung
    # from the moment the worker hung (the hook writes its marker, then sleeps): the
    # run's own start-up and the subjects before the hang are not the stall
    took = ended - hung.stat().st_mtime
    print(f"stall: the run ended {took:.1f} s after the worker hung (--stall-timeout 40)")
    # not before the timeout either (less a little: Ray Data's clock starts when the hung
    # subject's block moved into the actor, a moment before the hook wrote its marker)
    assert 40 - 5 <= took <= 40 + 20, f"ended {took:.0f} s after the hang, not in 40 + 20 s"
    for name in store.FINAL_FILES:
        assert (out / name).is_file(), name
    errors = pd.read_csv(out / "errors.csv").set_index("subject_id")
    assert victim in errors.index
    assert set(errors.error_type) == {"Stalled"} and set(errors.stage) == {"pipeline"}
    assert errors.message.str.contains("--stall-timeout").all()
    done = set(features(out).subject_id)
    assert done, "nothing finished before the stall"
    assert done | set(errors.index) == {s.subject_id for s in subset}
    assert_same_results(out, reference, done)
    assert run_json(out)["counts"]["failed"] == len(errors)


# ---------------------------------------------------------------------- resume


@pytest.mark.timeout(600)
def test_rerun_redoes_only_changed_subjects_and_rewrites_summaries(
    ray_session: None, good: Path, good_ids: set[str], reference: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copytree(good.parent, tmp_path / "data"))
    out = Path(shutil.copytree(reference, tmp_path / "out"))
    subjects = list(read_manifest(data / "manifest.csv"))
    changed, moved = subjects[2], subjects[7]
    img = nib.load(changed.image)
    hu = np.asarray(img.dataobj).astype(np.int16) + np.int16(25)
    nib.save(nib.Nifti1Image(hu, img.affine, img.header), changed.image)
    relabelled = [
        Subject(s.subject_id, s.image, s.mask, "moved" if s == moved else s.cohort, None, s.row)
        for s in subjects
    ]
    manifest = write_manifest(relabelled, data / "manifest.csv")
    # temporary files as a crashed run and a run still writing would leave them
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer a process
    live = subprocess.Popen(["sleep", "120"])
    parts = store.Parts(out)
    dead_tmp = parts.root / f".{'a' * 8}.parquet.tmp-{dead.pid}"
    live_tmp = parts.root / f".{'b' * 8}.parquet.tmp-{live.pid}"
    for path in (dead_tmp, live_tmp):
        path.write_bytes(b"half a parquet file")

    try:
        result = cohort_run(manifest, out)
    finally:
        live.kill()
        live.wait()

    assert not dead_tmp.exists(), "a dead run's temporary file was left"
    assert live_tmp.read_bytes() == b"half a parquet file", "a live run's file was touched"
    assert result.exit_code == 0, result.output
    assert run_json(out)["counts"] == {"subjects": 10, "done": 1, "cached": 9, "failed": 0}
    others = frozenset({changed.subject_id})
    assert_same_results(out, reference, good_ids - others, others)
    got = features(out)
    mine = got[got.subject_id == changed.subject_id]
    theirs = features(reference)
    theirs = theirs[theirs.subject_id == changed.subject_id]
    assert len(mine) == 9
    assert not np.array_equal(np.stack(mine.vector), np.stack(theirs.vector))
    assert set(got[got.subject_id == moved.subject_id].cohort) == {"moved"}
    assert "moved" in set(pd.read_csv(out / "similarity.csv").cohort)


# -------------------------------------------------------------------- interrupt


def _stderr_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)
    lines.put("")  # EOF


# Under a loaded 2-core machine the reference run, the interrupted run and the
# rerun take up to ~10 minutes together; the bound is on hangs, not on speed.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("executor", ["ray", "in-process"])
def test_sigint_keeps_finished_subjects_and_rerun_does_only_the_rest(
    ray_session: None,
    good: Path,
    good_ids: set[str],
    reference: Path,
    tmp_path: Path,
    executor: str,
) -> None:
    """On a private Ray and in-process (the default for these ten subjects), with the
    reference's torch threads (two per actor, conftest), so that the vectors are equal.

    The run cannot finish before the signal, however busy the machine: the test hook
    hangs the extraction of the manifest's last subject, and SIGINT is sent once three
    subjects are done and that hang has begun (its marker exists), so a subject is
    known to be in progress."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = {}  # the final files of an earlier run in the same folder (no parts)
    for name in store.FINAL_FILES:
        shutil.copy2(reference / name, out / name)
        earlier[name] = (out / name).read_bytes()
    victim = list(read_manifest(good))[-1].subject_id
    hung = tmp_path / "hung"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    env["RAY_AUTH_MODE"] = "token"
    env[extraction.FAULT_SUBJECT_ENV] = victim
    env[extraction.FAULT_MARKER_ENV] = str(hung)
    env[extraction.FAULT_MODE_ENV] = "hang:3600"  # longer than the test may take
    command = [str(Path(sys.executable).with_name("cohort")), "run", str(good), "--out", str(out)]
    proc = subprocess.Popen(
        # --verbose: a line per finished subject
        interruptible([*command, *FAST, "--verbose", "--executor", executor, "--threads", "2"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, so a failed test can clean it up
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_stderr_lines, args=(proc.stderr, lines), daemon=True).start()
    printed: queue.Queue[str] = queue.Queue()  # drained, so that a full pipe blocks nothing
    threading.Thread(target=_stderr_lines, args=(proc.stdout, printed), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while sum(": done; " in line for line in seen) < 3 or not hung.exists():
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                assert time.monotonic() < deadline, f"no progress:\n{''.join(seen)}"
                continue
            assert line, f"cohort run ended before the signal:\n{''.join(seen)}"
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # say where it is stuck: every thread's stack
            proc.send_signal(signal.SIGUSR1)
            time.sleep(5)
        stopped_in = time.monotonic() - sent
        print(f"SIGINT after {len(seen)} stderr lines; stopped in {stopped_in:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while (line := lines.get(timeout=10)) != "":
        seen.append(line)
    stderr = "".join(seen)

    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "rerun the same command to continue" in stderr
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop"
    for name in store.FINAL_FILES:  # nothing half-done was published over the earlier run
        assert (out / name).read_bytes() == earlier[name], name
    parts = store.Parts(out)
    kept = parts.keys()
    assert 3 <= len(kept) < 10, stderr
    for key in kept:  # every part a rerun will trust is a whole, readable file
        assert pq.read_table(parts.path(key)).num_rows == 9

    result = cohort_run(good, out)

    assert result.exit_code == 0, result.output
    counts = run_json(out)["counts"]
    assert counts == {"subjects": 10, "done": 10 - len(kept), "cached": len(kept), "failed": 0}
    assert_same_results(out, reference, good_ids)
    for name in ("similarity.csv", "stats.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(parts.root.glob(".*.tmp-*"))


@pytest.mark.timeout(600)
def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on(good: Path, tmp_path: Path) -> None:
    """README: a run that seems stuck prints its threads' stacks on ``kill -USR1`` and
    goes on. In-process, the main thread is in the hang of the manifest's last
    subject when the signal comes; after the dump the run still answers Ctrl-C."""
    victim = list(read_manifest(good))[-1].subject_id
    hung = tmp_path / "hung"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    env[extraction.FAULT_SUBJECT_ENV] = victim
    env[extraction.FAULT_MARKER_ENV] = str(hung)
    env[extraction.FAULT_MODE_ENV] = "hang:3600"
    command = [str(Path(sys.executable).with_name("cohort")), "run", str(good)]
    command += ["--out", str(tmp_path / "out"), *FAST, "--executor", "in-process"]
    proc = subprocess.Popen(
        interruptible(command),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_stderr_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 400
        while not hung.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the hang never began"
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        dump: list[str] = []
        while not any("maybe_fire" in line for line in dump):
            dump.append(lines.get(timeout=60))  # queue.Empty: no stack within a minute
        time.sleep(1)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(dump)
    assert "Current thread 0x" in text and "(most recent call first)" in text, text
    assert alive, "SIGUSR1 ended the run"
    assert proc.returncode == 130


# ----------------------------------------------------------------------- weights


def test_weights_file_with_wrong_sha256_is_refused_with_both_hashes(
    tmp_path: Path, good: Path
) -> None:
    from cohort.inputs.fingerprint import sha256_file
    from cohort.model.network import random_weights

    path = tmp_path / "weights.pth"
    torch.save(random_weights("densenet121", 1).state_dict, path)
    actual = sha256_file(path)
    result = cohort_run(good, tmp_path / "out", "--weights", str(path),
                        "--weights-sha256", "ab" * 32)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert actual in result.output and "ab" * 32 in result.output
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("code ran while loading weights",))


def test_weights_with_pickled_code_are_refused_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"features.conv0.weight": torch.zeros(1), "x": _Payload()}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth"):
        load_weights(ModelConfig(weights=str(path)))
    assert "code ran" not in capsys.readouterr().out
