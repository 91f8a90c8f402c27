"""A folder of mixed DICOM files as a PACS export leaves it: ``cohort manifest
--match-by-uid`` pairs each SEG and RTSTRUCT with the series it references,
``cohort validate`` says what each subject's inputs are, and ``cohort run`` gives
the same vectors for the same regions as SEG, RTSTRUCT and NIfTI label map."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.inputs.fingerprint import sha256_path
from tests import dicom_objects as objects

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """export/: series A and B (same pixels, other UIDs), A's SEG, B's RTSTRUCT and a SEG
    of a series that is not there, all in one folder; a NIfTI label map beside it."""
    if not objects.SERIES.is_dir():
        pytest.skip(f"real data not found at {objects.SERIES}")
    root = tmp_path_factory.mktemp("export")
    folder = root / "export"
    a = objects.cropped_series(folder, series="series-a")
    staging = root / "b"
    b = objects.cropped_series(staging, series="series-b", frame_of_reference="for-b")
    for path in staging.iterdir():
        shutil.move(path, folder / f"B{path.name}")
    labels = objects.label_map_of(a)
    masks = {name: labels == value for value, name in enumerate(objects.NAMES, start=1)}
    lps = objects.affine_lps(b)
    objects.write_seg(a, masks, folder / "SEG_s01.dcm", name="seg-a")
    rois = {name: objects.boundary_contours(mask, lps) for name, mask in masks.items()}
    objects.write_rtstruct(b, rois, folder / "RT_s02.dcm", name="rt-b")
    gone = objects.cropped_series(tmp_path_factory.mktemp("gone"), series="series-gone")
    objects.write_seg(gone, masks, folder / "SEG_s09.dcm", name="seg-gone")
    import nibabel as nib

    nib.save(nib.Nifti1Image(labels, np.diag([-1.0, -1.0, 1.0, 1.0]) @ objects.affine_lps(a)),
             root / "labels.nii.gz")  # fmt: skip
    return root


def test_match_by_uid_pairs_each_segmentation_with_its_series(export: Path) -> None:
    out = export / "manifest.csv"
    result = CliRunner().invoke(
        main,
        ["manifest", str(export), "--mask", "export/*_{subject}.dcm", "--match-by-uid",
         "--cohort", "pacs", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # s09's series is not in the export
    assert "2 subjects (pacs)" in result.output and "1 unmatched" in result.output
    assert "mask without image:" in result.output and "SEG_s09.dcm (subject s09)" in result.output
    assert objects.uid("series-gone") in result.output
    rows = {row["subject_id"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"s01", "s02"}
    assert rows["s01"]["image"] == rows["s02"]["image"] == "export"
    assert rows["s01"]["series_uid"] == objects.uid("series-a")
    assert rows["s02"]["series_uid"] == objects.uid("series-b")
    assert rows["s02"]["mask"] == "export/RT_s02.dcm"
    both = CliRunner().invoke(
        main,
        ["manifest", str(export), "--image", "x/{subject}", "--mask", "{subject}",
         "--match-by-uid", "--out", str(out)],
    )  # fmt: skip
    assert both.exit_code == 2 and "one of them" in both.output


def test_match_by_uid_finds_series_in_symlinked_folders(export: Path, tmp_path: Path) -> None:
    """The image series are searched through links, as the masks are: a PACS export
    whose series folder is a link (an archive's farm) still pairs its segmentation."""
    root = tmp_path / "linked"
    (root / "segs").mkdir(parents=True)
    shutil.copy2(export / "export" / "SEG_s01.dcm", root / "segs" / "SEG_s01.dcm")
    (root / "series").symlink_to(export / "export", target_is_directory=True)
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main,
        ["manifest", str(root), "--mask", "segs/*_{subject}.dcm", "--match-by-uid",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["subject_id"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == {"s01"}
    assert rows["s01"]["image"] == "linked/series"  # relative to the manifest
    assert rows["s01"]["series_uid"] == objects.uid("series-a")


def write_manifest(export: Path) -> Path:
    manifest = export / "three.csv"
    manifest.write_text(
        "subject_id,image,mask,labels,series_uid\n"
        f"seg,export,export/SEG_s01.dcm,,{objects.uid('series-a')}\n"
        f"rt,export,export/RT_s02.dcm,,{objects.uid('series-b')}\n"
        f'nifti,export,labels.nii.gz,"bone=1,soft=2",{objects.uid("series-a")}\n',
        encoding="utf-8",
    )
    return manifest


# a layer these 20-slice series reach (DenseNet121's conv-1 needs 29 voxels along D)
SHALLOW = ("--layers", "features.denseblock3.denselayer1.conv2")


def test_validate_names_each_subjects_kinds_and_regions(export: Path) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(write_manifest(export)), "--labels", "bone,soft", *SHALLOW]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split("\t")[0]: line for line in result.output.splitlines()[1:]}
    assert "image: DICOM series (DICOM series " in lines["seg"]
    assert (
        "mask: DICOM SEG, segments (SegmentLabel) 'bone', 'soft'; labels use: bone, soft"
        in (lines["seg"])
    )
    assert "mask: RTSTRUCT, ROIs (ROIName) 'bone', 'soft'" in lines["rt"]
    assert "mask: label-map file, values 0, 1, 2; labels use: bone=1, soft=2" in lines["nifti"]
    only = CliRunner().invoke(
        main, ["validate", str(write_manifest(export)), "--labels", "soft", *SHALLOW]
    )
    lines = {line.split("\t")[0]: line for line in only.output.splitlines()[1:]}
    assert "segments (SegmentLabel) 'bone', 'soft'; labels use: soft" in lines["seg"]


def test_run_gives_seg_rtstruct_and_nifti_the_same_vectors(export: Path) -> None:
    out = export / "results"
    args = ["run", str(write_manifest(export)), "--out", str(out), "--labels", "bone,soft",
            "--layers", "features.denseblock3.denselayer1.conv2", "--weights", "random",
            "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    features = pd.read_parquet(out / "features.parquet")
    by = {(row.subject_id, row.region): np.asarray(row.vector) for row in features.itertuples()}
    for region in ("bone", "soft", "background"):  # A and B hold the same pixels
        np.testing.assert_array_equal(by[("seg", region)], by[("nifti", region)])
        np.testing.assert_array_equal(by[("rt", region)], by[("nifti", region)])


def test_the_resume_key_hashes_the_segmentation_file(export: Path, tmp_path: Path) -> None:
    seg = tmp_path / "seg.dcm"
    shutil.copy(export / "export" / "SEG_s01.dcm", seg)
    before = sha256_path(seg)
    folder = tmp_path / "seg-folder"
    folder.mkdir()
    shutil.copy(seg, folder / "1.dcm")
    folder_before = sha256_path(folder)
    with seg.open("ab") as handle:
        handle.write(b"\0\0")
    with (folder / "1.dcm").open("ab") as handle:
        handle.write(b"\0\0")
    assert sha256_path(seg) != before and sha256_path(folder) != folder_before
