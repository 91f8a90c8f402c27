"""The resume key sees every byte a subject is read from, and what the run resolves
that changes vectors (the device, the torch threads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import RunConfig
from cohort.execution.load import READY, load_subject
from cohort.inputs.fingerprint import data_files, execution_identity
from cohort.synthetic import make_phantom_cohort

pytestmark = pytest.mark.timeout(120)


def _pair(folder: Path, suffix: str) -> tuple[Path, Path]:
    """A CT written with a detached header (``suffix``) and its label map as NRRD."""
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1500, (40, 48, 48)).astype(np.int16)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[8:20, 10:30, 10:30] = 1
    labels[22:34, 10:30, 10:30] = 2
    image, mask = folder / f"ct{suffix}", folder / "seg.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(hu), str(image), False)  # uncompressed data file
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(mask))
    return image, mask


def _row(image: Path, mask: Path) -> dict[str, Any]:
    return {
        "subject_id": "s1",
        "cohort": "all",
        "image": str(image),
        "mask": str(mask),
        "labels": "tibia=1,femur=2",
    }


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_a_corrected_data_file_of_a_detached_header_moves_the_key(
    tmp_path: Path, suffix: str
) -> None:
    image, mask = _pair(tmp_path, suffix)
    header = image.read_bytes()
    (data,) = [p for p in tmp_path.iterdir() if p.name.startswith("ct.") and p != image]
    before = load_subject(_row(image, mask), RunConfig(), "id", frozenset())
    assert before["status"] == READY, before["message"]
    raw = bytearray(data.read_bytes())
    raw[200:202] = b"\x00\x00" if raw[200:202] != b"\x00\x00" else b"\x01\x00"
    data.write_bytes(bytes(raw))  # one voxel corrected, the header untouched
    assert image.read_bytes() == header
    after = load_subject(_row(image, mask), RunConfig(), "id", frozenset({before["key"]}))
    assert after["status"] == READY, "the old subject was reused after its data file changed"
    assert after["key"] != before["key"]
    assert data_files(image, header) == [data]


def test_data_files_follow_lists_and_patterns(tmp_path: Path) -> None:
    mhd = b"NDims = 3\nElementType = MET_SHORT\nElementDataFile = LIST 2D\ns0.raw\ns1.raw\n"
    assert data_files(tmp_path / "a.mhd", mhd) == [tmp_path / "s0.raw", tmp_path / "s1.raw"]
    nhdr = b"NRRD0004\ntype: short\ndata file: slice%03d.raw 1 5 2\n"
    expected = [tmp_path / f"slice{n:03d}.raw" for n in (1, 3, 5)]
    assert data_files(tmp_path / "a.nhdr", nhdr) == expected
    assert data_files(tmp_path / "a.mha", b"ElementDataFile = LOCAL\n") == []
    assert data_files(tmp_path / "a.mhd", b"ElementDataFile = LOCAL\n") == []
    assert data_files(tmp_path / "b.nhdr", b"NRRD0004\ndatafile: ../x.raw.gz\n") == [
        tmp_path / "../x.raw.gz"
    ]


def test_the_device_and_the_threads_are_in_the_key() -> None:
    base = execution_identity("options", "cpu", 2)
    assert execution_identity("options", "cpu", 2) == base
    assert execution_identity("options", "cuda", 2) != base
    assert execution_identity("options", "cpu", 1) != base
    assert execution_identity("options", "cpu", None) != base


@pytest.mark.timeout(300)
def test_a_rerun_with_other_threads_recomputes_and_with_the_same_reuses(tmp_path: Path) -> None:
    """Torch threads change float32 sums' order, so vectors at the last digits: a
    subject done with 1 thread is not reused by a run with 2."""
    manifest = make_phantom_cohort(tmp_path / "cohort", n_per_cohort=1, shape=(48, 64, 64), seed=2)
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--weights", "random", "--quiet"]
    args += ["--executor", "in-process", "--no-report"]

    def run(threads: str) -> str:
        result = CliRunner().invoke(main, [*args, "--threads", threads])
        assert result.exit_code == 0, result.output
        return result.output

    assert "2 done, 0 reused" in run("1")
    assert "2 done, 0 reused" in run("2")
    assert "0 done, 2 reused" in run("2")
