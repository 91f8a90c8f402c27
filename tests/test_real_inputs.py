"""Real inputs through `cohort run`: the ct-dicom-20 series and the knee-3702 label maps.

The DICOM series is read in place; its NIfTI twin is written by the test from
pydicom's pixels and a geometry worked out here from the DICOM tags (the
independent reader of tests/test_dicom.py), so the two runs share nothing but
the numbers. Masks are thresholds inside a box, written stored LAS while the
image is LPS (as a segmentation tool and a DICOM converter write them). The
knee masks carry a real LPS header; they are cropped and subsampled here to
keep the runs fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from cohort.cli.main import main
from cohort.config import PreprocessConfig
from cohort.execution.load import RESAMPLED_NOTE
from cohort.inputs.stages import prepare
from tests.nifti_helpers import save_nifti
from tests.test_dicom import SERIES, edited_copy, position_order, pydicom_reference
from tests.test_formats import segment, write_itk, write_seg_nrrd
from tests.test_inputs import stored_as

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-3702"
FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS
SHALLOW = "features.denseblock2.denselayer12.conv2,features.denseblock3.denselayer1.conv2"
FAST = ["--weights", "random", "--quiet", "--stall-timeout", "300", "--bootstrap", "50",
        "--permutations", "9", "--no-report"]  # fmt: skip
Vectors = dict[tuple[str, str], np.ndarray]


def cohort_run(manifest: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), *FAST, *extra])


def by_subject(out: Path) -> dict[str, Vectors]:
    frame = pq.read_table(out / "features.parquet").to_pandas()
    found: dict[str, Vectors] = {}
    for row in frame.itertuples():
        found.setdefault(str(row.subject_id), {})[(str(row.region), str(row.layer))] = np.asarray(
            row.vector
        )
    return found


def max_relative_difference(a: Vectors, b: Vectors) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in a)


def write_manifest_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    pd.DataFrame(rows).fillna("").to_csv(path, index=False)
    return path


def errors(out: Path) -> dict[str, dict[str, str]]:
    frame = pd.read_csv(out / "errors.csv", dtype=str).fillna("")
    return {row["subject_id"]: row for row in frame.to_dict("records")}


# ------------------------------------------------------------------ ct-dicom-20


def dicom_affine(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU (column, row, slice) by pydicom and the voxel -> RAS affine from the tags."""
    hu, datasets = pydicom_reference(folder)
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    first = np.array(datasets[0].ImagePositionPatient, dtype=np.float64)
    last = np.array(datasets[-1].ImagePositionPatient, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * column_spacing  # i: along a row, one column to the next
    lps[:3, 1] = iop[3:] * row_spacing  # j: down a column
    lps[:3, 2] = (last - first) / (len(datasets) - 1)  # k: slice to slice, by position
    lps[:3, 3] = first
    affine = np.eye(4)
    affine[:3, :] = FLIP @ lps[:3, :]
    return hu, affine


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The series' twins and masks: every input kind on the series' grid."""
    if not SERIES.is_dir():
        pytest.skip(f"real data not found at {SERIES}")
    folder = tmp_path_factory.mktemp("ct")
    hu, affine = dicom_affine(SERIES)
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    box = np.zeros(hu.shape, dtype=bool)
    box[170:330, 160:320, :] = True
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[box & (hu > -300)] = 1  # "body": soft tissue in the box
    labels[box & (hu > 250)] = 2  # "bone"
    las, las_affine = stored_as(labels, affine, (0, 1, 2), (False, True, False))
    assert "".join(nib.aff2axcodes(las_affine)) == "LAS"
    paths = {
        "dicom": SERIES,
        "nifti": save_nifti(folder / "ct.nii.gz", hu.astype(np.int16), affine),
        "mask": save_nifti(folder / "mask-las.nii.gz", las, las_affine),
        "nrrd": write_itk(folder / "ct.nrrd", hu.astype(np.int16), affine),
        "mha": write_itk(folder / "labels.mha", labels, affine),
        "seg": write_seg_nrrd(
            folder / "ct.seg.nrrd",
            labels[np.newaxis],
            affine,
            segment(0, "body", 0, 1) + segment(1, "bone", 0, 2),
        ),
        "folder": folder / "masks",
        "broken": edited_copy(
            SERIES,
            folder / "broken",
            lambda n, ds: None if ds.filename.endswith(position_order(SERIES)[7]) else ds,
        ),
    }
    paths["folder"].mkdir()
    save_nifti(paths["folder"] / "body.nii.gz", (labels == 1).astype(np.uint8), affine)
    write_itk(paths["folder"] / "bone.nrrd", (labels == 2).astype(np.uint8), affine)
    # the image cropped in plane, its mask left on the full field of view
    shift = np.eye(4)
    shift[:3, 3] = (140, 130, 0)
    paths["cropped"] = save_nifti(
        folder / "ct-cropped.nii.gz", hu[140:360, 130:350].astype(np.int16), affine @ shift
    )
    shift[:3, 3] = (200, 130, 0)
    paths["too-small"] = save_nifti(
        folder / "ct-small.nii.gz", hu[200:300, 130:350].astype(np.int16), affine @ shift
    )
    return paths


@pytest.mark.parametrize("executor", ["ray", "in-process"])
def test_every_input_kind_of_the_dicom_series_gives_the_nifti_vectors(
    ray_session: None, ct: dict[str, Path], tmp_path: Path, executor: str
) -> None:
    """One run: the DICOM folder, its NIfTI/NRRD twins, a mask folder, a .seg.nrrd, a mask
    on a larger grid (resampled), a broken series and a region outside a cropped image;
    on Ray's loader processes and on an in-process run's loader threads."""
    names = "body,bone"
    rows = [
        {"subject_id": "dicom", "image": ct["dicom"], "mask": ct["mask"]},
        {"subject_id": "nifti", "image": ct["nifti"], "mask": ct["mask"]},
        {"subject_id": "nrrd", "image": ct["nrrd"], "mask": ct["mha"]},
        {"subject_id": "folder", "image": ct["nifti"], "mask": ct["folder"], "labels": names},
        {"subject_id": "seg", "image": ct["dicom"], "mask": ct["seg"], "labels": names},
        {"subject_id": "cropped", "image": ct["cropped"], "mask": ct["mask"]},
        {"subject_id": "broken", "image": ct["broken"], "mask": ct["mask"]},
        {"subject_id": "too-small", "image": ct["too-small"], "mask": ct["mask"]},
    ]
    manifest = write_manifest_rows(tmp_path / "manifest.csv", rows)
    out = tmp_path / "out"
    result = cohort_run(manifest, out, "--labels", "body=1,bone=2", "--layers", SHALLOW,
                        "--crop-margin", "5", "--mask-resample", "nearest",
                        "--executor", executor)  # fmt: skip
    assert result.exit_code == 1, result.output
    vectors = by_subject(out)
    assert set(vectors) == {"dicom", "nifti", "nrrd", "folder", "seg", "cropped"}
    assert {region for region, _ in vectors["dicom"]} == {"body", "bone", "background"}
    assert max_relative_difference(vectors["dicom"], vectors["nifti"]) <= 1e-6
    for other in ("nrrd", "folder", "seg", "cropped"):
        assert max_relative_difference(vectors[other], vectors["nifti"]) <= 1e-6, other
    failed = errors(out)
    assert set(failed) == {"broken", "too-small"}
    broken = failed["broken"]
    assert (broken["stage"], broken["error_type"]) == ("load", "GeometryError")
    assert "a missing slice" in broken["message"] and "copy the whole series" in broken["message"]
    small = failed["too-small"]
    assert (small["stage"], small["error_type"]) == ("check", "RegionError")
    assert "outside the image" in small["message"] and RESAMPLED_NOTE in small["message"]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"subjects": 8, "done": 6, "cached": 0, "failed": 2}
    assert run["resampled_masks"] == {"count": 2, "subjects": ["cropped", "too-small"]}


def test_thin_slab_with_the_default_layers_fails_at_check_then_runs_shallower(
    ray_session: None, ct: dict[str, Path], tmp_path: Path
) -> None:
    rows = [{"subject_id": "slab", "image": str(ct["dicom"]), "mask": str(ct["mask"])}]
    manifest = write_manifest_rows(tmp_path / "manifest.csv", rows)
    result = cohort_run(manifest, tmp_path / "out", "--labels", "body=1,bone=2")
    assert result.exit_code == 1, result.output
    error = errors(tmp_path / "out")["slab"]
    assert (error["stage"], error["error_type"]) == ("check", "GeometryError")
    message = error["message"]
    print(message)
    assert "model input of 20x512x512 voxels" in message
    assert "at least 29 voxels along D, inferior-superior (20 here, 40 mm)" in message
    assert "hooked layers conv-1, conv-3, conv-5" in message
    assert "--spacing 1.403,0.9766,0.9766" in message
    assert "this input reaches features.denseblock3" in message
    layers = "features.denseblock3.denselayer24.conv2"
    again = cohort_run(manifest, tmp_path / "shallow", "--labels", "body=1,bone=2",
                       "--layers", layers, "--crop-margin", "5")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert set(by_subject(tmp_path / "shallow")) == {"slab"}


# ------------------------------------------------------------------- knee-3702


def subsampled(path: Path, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """The label map cropped to ``box`` and every second voxel in plane; its affine."""
    img = nib.load(path)
    labels = np.asarray(img.dataobj)[box][::2, ::2, :]
    step = np.diag([2.0, 2.0, 1.0, 1.0])
    step[:3, 3] = [s.start for s in box]
    return np.ascontiguousarray(labels), img.affine @ step


@pytest.mark.skipif(not (KNEE / "seg_b.nii.gz").is_file(), reason="real data not found")
def test_per_row_label_map_fixes_the_swapped_numbering_of_a_real_mask(
    ray_session: None, tmp_path: Path
) -> None:
    """seg_b numbers femur 1 and tibia 2: its row's labels 'tibia=2,femur=1' must give the
    vectors of seg_b renumbered by hand, and put the tibia below the femur."""
    box = (slice(130, 386), slice(110, 366), slice(20, 196))
    seg_a, affine = subsampled(KNEE / "seg_a.nii.gz", box)
    seg_b, affine_b = subsampled(KNEE / "seg_b.nii.gz", box)
    np.testing.assert_array_equal(affine, affine_b)
    assert "".join(nib.aff2axcodes(affine)) == "LPS"
    hu = np.where(seg_a > 0, 700, 40).astype(np.int16)  # synthetic HU on seg_a's bone shapes
    swapped = np.select([seg_b == 1, seg_b == 2], [2, 1], 0).astype(np.uint8)
    files = {
        "image": save_nifti(tmp_path / "knee.nii.gz", hu, affine),
        "a": save_nifti(tmp_path / "seg_a.nii.gz", seg_a, affine),
        "b": save_nifti(tmp_path / "seg_b.nii.gz", seg_b, affine),
        "b-renumbered": save_nifti(tmp_path / "seg_b_renumbered.nii.gz", swapped, affine),
    }
    rows = [
        {"subject_id": "a", "image": files["image"], "mask": files["a"], "labels": ""},
        {"subject_id": "b", "image": files["image"], "mask": files["b"],
         "labels": "tibia=2,femur=1"},
        {"subject_id": "b-renumbered", "image": files["image"], "mask": files["b-renumbered"],
         "labels": ""},
    ]  # fmt: skip
    manifest = write_manifest_rows(tmp_path / "manifest.csv", rows)
    result = cohort_run(manifest, tmp_path / "out", "--layers", SHALLOW, "--crop-margin", "4")
    assert result.exit_code == 0, result.output
    vectors = by_subject(tmp_path / "out")
    assert set(vectors) == {"a", "b", "b-renumbered"}
    assert max_relative_difference(vectors["b"], vectors["b-renumbered"]) == 0.0
    assert max_relative_difference(vectors["a"], vectors["b"]) > 1e-3  # other annotations
    prepared = prepare(
        files["image"], files["b"], (("tibia", 2), ("femur", 1)), False, PreprocessConfig()
    )
    depth = np.arange(prepared.image.shape[0])
    index = prepared.region_index
    tibia_d, femur_d = (
        float(np.average(depth, weights=np.count_nonzero(index == r, axis=(1, 2)))) for r in (0, 1)
    )
    assert tibia_d < femur_d  # the tibia is inferior, as it should be
