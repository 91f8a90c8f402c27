"""Inputs read as ITK-based tools read them (issue 23), each case made the way other
tools make it: a NIfTI whose qform and sform disagree, one with no orientation, one in
microns, its NRRD / MetaImage copies written by SimpleITK, masks stored in other axis
orders, a grid at exactly 45 degrees.

The reference is SimpleITK itself: where a voxel lies is asked of
``TransformIndexToPhysicalPoint`` (LPS, turned to RAS here), never of cohort's code.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import PreprocessConfig
from cohort.errors import GeometryError
from cohort.inputs import nifti
from cohort.inputs.manifest import Subject, write_manifest
from cohort.inputs.readers import load_pair, open_image
from cohort.inputs.segmentation import read_mask_folder
from cohort.inputs.stages import Stages
from cohort.inputs.volume import grid_corners

CFG = PreprocessConfig()
LABELS = (("tibia", 1), ("femur", 2))
SHAPE = (12, 10, 8)


def anatomy() -> tuple[np.ndarray, np.ndarray]:
    """HU (every voxel different) and a two-region label map on a 12 x 10 x 8 grid."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    hu = (-1000 + 7 * i + 31 * j + 101 * k).astype(np.int16)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:6, 2:7, 1:5] = 1
    labels[7:11, 3:8, 3:7] = 2
    return hu, labels


def rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def affine_of(
    rotation: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]
) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def save(
    path: Path,
    data: np.ndarray,
    *,
    qform: np.ndarray | None,
    sform: np.ndarray | None,
    qcode: int = 1,
    scode: int = 1,
    units: str = "mm",
) -> Path:
    img = nib.Nifti1Image(data, None)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(np.eye(4) if qform is None else qform, code=0 if qform is None else qcode)
    img.set_sform(np.eye(4) if sform is None else sform, code=0 if sform is None else scode)
    placed = sform if qform is None and sform is not None else qform
    if placed is not None:  # pixdim: the voxel sizes, as every writer sets them
        img.header.set_zooms(tuple(np.linalg.norm(placed[:3, :3], axis=0)))
    img.header.set_xyzt_units(xyz=units)
    nib.save(img, path)
    return path


def itk_corners(path: Path) -> np.ndarray:
    """The 8 corner voxel centres as SimpleITK places them, in RAS mm, in the order of
    :func:`cohort.inputs.volume.grid_corners`."""
    image = sitk.ReadImage(str(path))
    last = [n - 1 for n in image.GetSize()]
    points = [
        image.TransformIndexToPhysicalPoint((i, j, k))
        for i in (0, last[0])
        for j in (0, last[1])
        for k in (0, last[2])
    ]
    return np.array(points) * np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------ NIfTI headers


def test_disagreeing_qform_and_sform_are_refused_naming_both(tmp_path: Path) -> None:
    """The issue's case: sform_code 2, qform_code 1, origins 5 mm apart; the mask is
    written by SimpleITK from that CT (so on the grid ITK reads, the qform's). Today's
    main read the CT by its sform: refused against its own mask, and with
    --mask-resample nearest every region landed on air."""
    hu, labels = anatomy()
    qform = affine_of(np.eye(3), (0.8, 0.8, 2.0), (10.0, 20.0, 30.0))
    sform = affine_of(np.eye(3), (0.8, 0.8, 2.0), (15.0, 20.0, 30.0))
    ct = save(tmp_path / "ct.nii.gz", hu, qform=qform, sform=sform, qcode=1, scode=2)
    itk_ct = sitk.ReadImage(str(ct))
    mask_image = sitk.GetImageFromArray(labels.transpose(2, 1, 0).copy())
    mask_image.CopyInformation(itk_ct)
    mask = tmp_path / "seg.nii.gz"
    sitk.WriteImage(mask_image, str(mask))
    np.testing.assert_allclose(itk_corners(mask), grid_corners(SHAPE, qform), atol=1e-4)

    for resample in ("off", "nearest"):
        cfg = PreprocessConfig(mask_resample=resample)
        with pytest.raises(GeometryError) as caught:
            Stages(LABELS, cfg).checked(ct, mask)
        message = str(caught.value)
        assert "ct.nii.gz" in message and "qform (code 1" in message and "sform (code 2" in message
        assert "origin (10, 20, 30)" in message and "origin (15, 20, 30)" in message
        assert "5 mm apart" in message and "make the two agree" in message
    # cohort validate sees it too (it read nothing wrong before: it said no problem)
    manifest = write_manifest([Subject("s1", ct, mask, "all", None, 0)], tmp_path / "m.csv")
    result = CliRunner().invoke(main, ["validate", str(manifest)])
    assert result.exit_code == 1, result.output
    assert "qform" in result.output and "sform" in result.output


def test_agreeing_qform_and_sform_within_the_tolerance_are_read(tmp_path: Path) -> None:
    hu, _ = anatomy()
    qform = affine_of(rotation_z(20), (0.8, 0.8, 2.0), (10.0, 20.0, 30.0))
    sform = qform.copy()
    sform[:3, 3] += 2e-4  # 0.2 micrometres: the same grid
    path = save(tmp_path / "ct.nii", hu, qform=qform, sform=sform, qcode=1, scode=2)
    volume = open_image(path, CFG.max_voxels)()
    np.testing.assert_allclose(grid_corners(SHAPE, volume.affine), itk_corners(path), atol=1e-5)


def test_a_file_without_orientation_is_refused(tmp_path: Path) -> None:
    hu, _ = anatomy()
    path = save(tmp_path / "flat.nii", hu, qform=None, sform=None)
    with pytest.raises(GeometryError, match=r"flat\.nii has no orientation.*both 0"):
        open_image(path, CFG.max_voxels)


def test_a_sheared_sform_alone_is_refused_as_itk_refuses_it(tmp_path: Path) -> None:
    hu, _ = anatomy()
    sheared = affine_of(np.eye(3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    sheared[0, 2] = 0.7
    path = save(tmp_path / "tilt.nii", hu, qform=None, sform=sheared)
    with pytest.raises(RuntimeError):  # the reference refuses it
        sitk.ReadImage(str(path))
    with pytest.raises(
        GeometryError, match=r"tilt\.nii has an sform whose axes are not orthogonal"
    ):
        open_image(path, CFG.max_voxels)


HEADERS = {
    "qform only": {"qform": True, "sform": False, "qcode": 1, "scode": 0, "units": "mm"},
    "sform only, aligned": {"qform": False, "sform": True, "qcode": 0, "scode": 2, "units": "mm"},
    "both, scanner": {"qform": True, "sform": True, "qcode": 1, "scode": 1, "units": "mm"},
    "both, aligned": {"qform": True, "sform": True, "qcode": 2, "scode": 2, "units": "mm"},
    "microns": {"qform": True, "sform": True, "qcode": 1, "scode": 1, "units": "micron"},
    "metres": {"qform": True, "sform": False, "qcode": 1, "scode": 0, "units": "meter"},
    "unknown units": {"qform": True, "sform": False, "qcode": 1, "scode": 0, "units": "unknown"},
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_nifti_and_its_itk_copies_give_the_same_world_grid(tmp_path: Path, case: str) -> None:
    """The file read as NIfTI, and as the NRRD and MetaImage copies SimpleITK writes of
    it, lies where SimpleITK puts it (corner voxel centres, 1e-3 mm)."""
    spec = HEADERS[case]
    hu, _ = anatomy()
    affine = affine_of(rotation_z(30), (0.7, 0.9, 2.5), (-40.0, 12.5, 101.0))
    if spec["units"] == "micron":
        affine = affine_of(rotation_z(30), (700.0, 900.0, 2500.0), (-4e4, 1.25e4, 1.01e5))
    if spec["units"] == "meter":
        affine = affine_of(rotation_z(30), (7e-4, 9e-4, 2.5e-3), (-0.04, 0.0125, 0.101))
    path = save(
        tmp_path / "ct.nii.gz",
        hu,
        qform=affine if spec["qform"] else None,
        sform=affine if spec["sform"] else None,
        qcode=int(spec["qcode"]),
        scode=int(spec["scode"]),
        units=str(spec["units"]),
    )
    reference = itk_corners(path)
    # millimetres, whatever the file's units: 0.7 mm along i, as written in mm here
    step = np.linalg.norm(reference[4] - reference[0]) / (SHAPE[0] - 1)
    assert step == pytest.approx(0.7, rel=1e-5)
    copies = [path]
    for suffix in (".nrrd", ".mha"):
        copies.append(tmp_path / f"ct{suffix}")
        sitk.WriteImage(sitk.ReadImage(str(path)), str(copies[-1]))
    for copy in copies:
        volume = open_image(copy, CFG.max_voxels)()
        np.testing.assert_array_equal(volume.data, hu.astype(np.float32))
        np.testing.assert_allclose(grid_corners(SHAPE, volume.affine), reference, atol=1e-3)


def test_an_sform_whose_voxel_sizes_are_not_pixdim_is_refused(tmp_path: Path) -> None:
    """SimpleITK takes the voxel sizes from pixdim and the directions from the sform;
    nibabel the sform's own column lengths: a file where they differ means two grids."""
    hu, _ = anatomy()
    sform = affine_of(np.eye(3), (0.7, 0.9, 2.5), (1.0, 2.0, 3.0))
    path = save(tmp_path / "ct.nii", hu, qform=None, sform=sform, scode=2)
    img = nib.load(path)
    img.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(img, path)
    assert np.linalg.norm(itk_corners(path)[4] - itk_corners(path)[0]) == pytest.approx(11.0)
    with pytest.raises(GeometryError, match=r"voxel sizes \(0\.7, 0\.9, 2\.5 mm\).*pixdim"):
        open_image(path, CFG.max_voxels)


def test_nifti_tolerance_is_the_run_default() -> None:
    assert PreprocessConfig().affine_tolerance_mm == nifti.TOLERANCE_MM


# ------------------------------------------------------------------ grids compared


def test_mask_folder_files_stored_in_different_axis_orders_share_one_grid(
    tmp_path: Path,
) -> None:
    """One mask file stored LPS, the other RAS, over one grid: read as the same regions
    as the label map (today's main compared the stored affines and refused it)."""
    hu, labels = anatomy()
    affine = affine_of(np.eye(3), (0.8, 0.8, 2.0), (10.0, 20.0, 30.0))
    folder = tmp_path / "masks"
    folder.mkdir()
    save(folder / "tibia.nii.gz", (labels == 1).astype(np.uint8), qform=affine, sform=affine)
    lps = affine @ np.array(
        [[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]]
    )
    femur = np.ascontiguousarray((labels == 2)[::-1, ::-1, :]).astype(np.uint8)
    save(folder / "femur.nii.gz", femur, qform=lps, sform=lps)
    regions = read_mask_folder(folder)  # stored as its first file, femur, is: LPS
    np.testing.assert_array_equal(regions.affine, nib.load(folder / "femur.nii.gz").affine)
    got = dict(regions.select(["tibia", "femur"]))
    np.testing.assert_array_equal(got["tibia"], (labels == 1)[::-1, ::-1, :])
    np.testing.assert_array_equal(got["femur"], (labels == 2)[::-1, ::-1, :])

    image = save(tmp_path / "ct.nii.gz", hu, qform=affine, sform=affine)
    label_map = save(tmp_path / "seg.nii.gz", labels, qform=affine, sform=affine)
    stages = Stages((("tibia", None), ("femur", None)), CFG)
    from_folder = stages.preprocess(stages.checked(image, folder), True)
    stages = Stages(LABELS, CFG)
    from_map = stages.preprocess(stages.checked(image, label_map), True)
    np.testing.assert_array_equal(from_folder.region_index, from_map.region_index)
    np.testing.assert_array_equal(from_folder.image, from_map.image)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3)))[1:])
def test_a_45_degree_grid_matches_itself_stored_with_permuted_axes(
    tmp_path: Path, order: tuple[int, int, int]
) -> None:
    """A grid at exactly 45 degrees about z, and the mask stored with its axes permuted:
    written to NIfTI (float32), the closest canonical axes of the two may tie-break
    differently; they are the same grid and give the same model input."""
    hu, labels = anatomy()
    affine = affine_of(rotation_z(45), (0.8, 0.8, 2.0), (10.0, 20.0, 30.0))
    image = save(tmp_path / "ct.nii.gz", hu, qform=affine, sform=affine)
    alike = save(tmp_path / "alike.nii.gz", labels, qform=affine, sform=affine)
    permuted = np.ascontiguousarray(labels.transpose(order))
    moved = affine[:, [*order, 3]]
    other = save(tmp_path / "permuted.nii.gz", permuted, qform=moved, sform=moved)
    stages = Stages(LABELS, CFG)
    reference = stages.preprocess(stages.checked(image, alike), True)
    got = stages.preprocess(stages.checked(image, other), True)
    np.testing.assert_array_equal(got.region_index, reference.region_index)
    np.testing.assert_array_equal(got.image, reference.image)
    assert got.voxels == reference.voxels and not got.mask_resampled


def test_a_pair_stored_in_different_orders_loads_as_stored(tmp_path: Path) -> None:
    """Loading keeps both as stored; the check stage re-indexes the mask (no values change)."""
    hu, labels = anatomy()
    affine = affine_of(np.eye(3), (0.8, 0.8, 2.0), (10.0, 20.0, 30.0))
    image = save(tmp_path / "ct.nii.gz", hu, qform=affine, sform=affine)
    moved = affine[:, [2, 0, 1, 3]]
    mask = save(
        tmp_path / "seg.nii.gz", np.ascontiguousarray(labels.transpose(2, 0, 1)),
        qform=moved, sform=moved,
    )  # fmt: skip
    pair = load_pair(image, mask, CFG, LABELS)
    assert pair.regions.shape == (8, 12, 10)
    checked = Stages(LABELS, CFG).check(pair)
    np.testing.assert_array_equal(checked.regions.labels, labels)  # type: ignore[union-attr]
