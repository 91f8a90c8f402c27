"""DICOM series: the real ct-dicom-20 series against an independent pydicom reader,
and broken copies of it, each refused with the fix.

The series is read in place from the shared data folder; broken copies are
written with pydicom into tmp_path (pixel data kept compressed as they are).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian

from cohort.errors import GeometryError, InputError
from cohort.inputs.dicom import list_dicom_series, read_dicom_series
from cohort.inputs.volume import LPS_TO_RAS, Volume

pytestmark = pytest.mark.timeout(120)

SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-dicom-20"
OTHER_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000001"

Edit = Callable[[int, pydicom.Dataset], pydicom.Dataset | None]


@pytest.fixture(scope="module")
def series() -> Path:
    if not SERIES.is_dir():
        pytest.skip(f"real data not found at {SERIES}")
    return SERIES


# ------------------------------------------------------- the independent reader


def pydicom_reference(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """HU in (column, row, slice) order and the datasets in slice order, by pydicom alone.

    Slices sorted by ImagePositionPatient projected on the normal of
    ImageOrientationPatient; HU = stored * RescaleSlope + RescaleIntercept per slice.
    """
    datasets: list[pydicom.Dataset] = []
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue  # README.md
        if "ImagePositionPatient" in ds:  # not a DICOMDIR
            datasets.append(ds)
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    slices = [
        ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for ds in datasets
    ]
    return np.stack([hu.T for hu in slices], axis=-1), datasets  # hu[row, column] -> [i=col, j=row]


def world_lps(ds: pydicom.Dataset, i: int, j: int) -> np.ndarray:
    """DICOM's formula: IPP + i * column spacing * row cosines + j * row spacing * col cosines."""
    iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    position = np.array(ds.ImagePositionPatient, dtype=np.float64)
    return position + i * column_spacing * iop[:3] + j * row_spacing * iop[3:]


def assert_matches_reference(volume: Volume, folder: Path) -> None:
    hu, datasets = pydicom_reference(folder)
    assert volume.data.dtype == np.float32
    assert volume.shape == hu.shape
    np.testing.assert_array_equal(volume.data, hu.astype(np.float32))
    last_i, last_j = volume.shape[0] - 1, volume.shape[1] - 1
    for k, ds in enumerate(datasets):  # every slice's own position, four corners each
        for i, j in ((0, 0), (last_i, 0), (0, last_j), (last_i, last_j)):
            ras = volume.affine @ np.array([i, j, k, 1.0])
            np.testing.assert_allclose(LPS_TO_RAS @ ras[:3], world_lps(ds, i, j), rtol=0, atol=1e-4)


def edited_copy(source: Path, target: Path, edit: Edit) -> Path:
    """Copy a series file by file through ``edit(index in name order, dataset)``;
    None drops the file."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.name.startswith("CT."))
    for n, path in enumerate(files):
        ds = edit(n, pydicom.dcmread(path))
        if ds is not None:
            ds.save_as(target / path.name)
    return target


def refusal(source: Path, target: Path, edit: Edit) -> str:
    """The GeometryError's message on reading ``source`` copied through ``edit``."""
    with pytest.raises(GeometryError) as info:
        read_dicom_series(edited_copy(source, target, edit))
    return str(info.value)


def position_order(folder: Path) -> list[str]:
    """File names sorted by z (this series is axial, IOP (1,0,0,0,1,0))."""
    files = [p for p in folder.iterdir() if p.name.startswith("CT.")]
    z = {
        p.name: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in files
    }
    return sorted(z, key=z.__getitem__)


# ----------------------------------------------------------------- the real series


def test_real_series_matches_independent_pydicom_reader(series: Path) -> None:
    volume = read_dicom_series(series)
    assert volume.shape == (512, 512, 20)
    assert volume.description == "DICOM series <empty SeriesInstanceUID> (20 slices)"
    assert_matches_reference(volume, series)
    # the README's facts: 0.9766 mm pixels, 2 mm apart (not SliceThickness 3), HU = stored - 1024
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), [0.9765625] * 2 + [2])
    assert float(volume.data.min()) == -1024.0


def test_real_series_listed_once_with_its_empty_uid(series: Path) -> None:
    (only,) = list_dicom_series(series)
    assert (only.uid, only.description, len(only.files)) == ("", "CT Body 3.0", 20)
    assert only.label() == "<empty> 'CT Body 3.0' (20 slices)"


def test_slice_order_comes_from_positions_not_file_names(series: Path, tmp_path: Path) -> None:
    names = position_order(series)
    reversed_names = {name: f"slice{len(names) - n:03d}.dcm" for n, name in enumerate(names)}
    out = tmp_path / "renamed"
    out.mkdir()
    for name, new in reversed_names.items():  # name order is now the reverse of position order
        shutil.copy(series / name, out / new)
    volume = read_dicom_series(out)
    np.testing.assert_array_equal(volume.data, read_dicom_series(series).data)
    assert_matches_reference(volume, out)


def test_each_slice_keeps_its_own_rescale(series: Path, tmp_path: Path) -> None:
    def halve_slope(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if n == 5:
            ds.RescaleSlope = "0.5"  # HU of this slice only: stored / 2 - 1024, halves included
        return ds

    out = edited_copy(series, tmp_path / "slope", halve_slope)
    volume = read_dicom_series(out)
    assert_matches_reference(volume, out)
    assert np.any(volume.data % 1 == 0.5)


def test_readme_and_dicomdir_in_the_folder_are_ignored(series: Path, tmp_path: Path) -> None:
    out = edited_copy(series, tmp_path / "with-dicomdir", lambda n, ds: ds)
    shutil.copy(series / "README.md", out / "README.md")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.1.3.10")  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.2")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir = FileDataset("DICOMDIR", {}, file_meta=meta, preamble=b"\0" * 128)
    dicomdir.FileSetID = "COHORT"
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = []
    dicomdir.save_as(out / "DICOMDIR", enforce_file_format=True)
    assert_matches_reference(read_dicom_series(out), out)
    assert len(list_dicom_series(out)[0].files) == 20


# ------------------------------------------------------------------ broken series


def test_missing_slice_is_named_with_its_neighbours(series: Path, tmp_path: Path) -> None:
    names = position_order(series)
    dropped = names[7]
    message = refusal(
        series, tmp_path / "gap", lambda n, ds: None if ds.filename.endswith(dropped) else ds
    )
    assert str(tmp_path / "gap") in message
    assert "a gap of 4 mm where the other slices are 2 mm apart: a missing slice" in message
    assert names[6] in message and names[8] in message
    assert "copy the whole series again" in message


def test_moved_slice_is_uneven_spacing_with_positions_and_files(
    series: Path, tmp_path: Path
) -> None:
    names = position_order(series)

    def move(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if ds.filename.endswith(names[7]):
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.5]  # -790.5 -> -790.0 mm
        return ds

    message = refusal(series, tmp_path / "moved", move)
    assert "not evenly spaced" in message
    assert f"from -792.5 mm (file {names[6]}) to -790 mm (file {names[7]})" in message
    assert "a gap of 2.5 mm where the other slices are 2 mm apart" in message
    assert "resample the series to an even spacing" in message


def test_duplicate_position_is_more_than_one_volume(series: Path, tmp_path: Path) -> None:
    out = edited_copy(series, tmp_path / "copy", lambda n, ds: ds)
    name = position_order(series)[3]
    shutil.copy(out / name, out / "copy-of-a-slice")
    with pytest.raises(GeometryError, match=r"two slices at one position .* keep one volume's"):
        read_dicom_series(out)


def test_two_series_in_one_folder_are_listed_and_one_can_be_picked(
    series: Path, tmp_path: Path
) -> None:
    out = edited_copy(series, tmp_path / "two", lambda n, ds: ds)
    names = position_order(series)

    def other_series(n: int, ds: pydicom.Dataset) -> pydicom.Dataset | None:
        if not any(ds.filename.endswith(name) for name in names[:8]):
            return None
        ds.SeriesInstanceUID = OTHER_UID
        ds.SeriesDescription = "CT Bone"
        return ds

    second = edited_copy(series, tmp_path / "second", other_series)
    for path in second.iterdir():
        shutil.copy(path, out / f"other-{path.name}")
    with pytest.raises(InputError) as info:
        read_dicom_series(out)
    message = str(info.value)
    assert f"folder {out} holds 2 DICOM series" in message
    assert "<empty> 'CT Body 3.0' (20 slices)" in message
    assert f"{OTHER_UID} 'CT Bone' (8 slices)" in message
    assert "`series_uid`" in message
    picked = read_dicom_series(out, series_uid=OTHER_UID)
    assert picked.description == f"DICOM series {OTHER_UID} (8 slices)"
    assert_matches_reference(picked, second)
    assert_matches_reference(read_dicom_series(out, series_uid=""), series)
    with pytest.raises(InputError, match=r"no DICOM series with SeriesInstanceUID '1\.2\.3'.*"):
        read_dicom_series(out, series_uid="1.2.3")


def rotate_about_x(degrees: float) -> list[float]:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return [1.0, 0.0, 0.0, 0.0, float(c), float(s)]


def test_tilted_orientation_is_refused_as_gantry_tilt(series: Path, tmp_path: Path) -> None:
    def tilt(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.ImageOrientationPatient = rotate_about_x(15.0)  # positions still step along z
        return ds

    message = refusal(series, tmp_path / "tilt", tilt)
    assert "not stacked along the slice normal" in message
    assert "15 degrees off the normal" in message
    assert "dcm2niix corrects gantry tilt" in message


def test_non_orthogonal_orientation_is_refused(series: Path, tmp_path: Path) -> None:
    def shear(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.1, 0.99498744, 0.0]  # unit, not orthogonal
        return ds

    message = refusal(series, tmp_path / "shear", shear)
    assert re.search(r"not two orthogonal unit vectors .*dot product 0\.1", message)


def test_mixed_orientations_are_refused(series: Path, tmp_path: Path) -> None:
    name = position_order(series)[4]

    def one_tilted(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if ds.filename.endswith(name):
            ds.ImageOrientationPatient = rotate_about_x(10.0)
        return ds

    message = refusal(series, tmp_path / "mixed", one_tilted)
    assert "mixes slice orientations (ImageOrientationPatient)" in message
    assert f"in 1 (e.g. {name})" in message
    assert "remove the odd files" in message


def test_mixed_slice_sizes_are_refused(series: Path, tmp_path: Path) -> None:
    name = position_order(series)[4]

    def one_small(n: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        if ds.filename.endswith(name):
            small = np.ascontiguousarray(ds.pixel_array[::2, ::2])
            ds.decompress()
            ds.Rows, ds.Columns = small.shape
            ds.PixelSpacing = [2 * float(v) for v in ds.PixelSpacing]
            ds.PixelData = small.tobytes()
        return ds

    message = refusal(series, tmp_path / "sizes", one_small)
    assert "mixes slice sizes (Rows x Columns): 512x512 in 19 file(s)" in message
    assert f"256x256 in 1 (e.g. {name})" in message


def test_size_limit_from_the_headers(series: Path) -> None:
    with pytest.raises(InputError, match=r"512x512x20 = 5,242,880 voxels.*limit of 5,242,879"):
        read_dicom_series(series, max_voxels=512 * 512 * 20 - 1)


def test_folder_without_dicom_files_names_it(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no slices here\n")
    (tmp_path / "series-1").mkdir()
    with pytest.raises(InputError) as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    assert f"folder {tmp_path} holds no DICOM image files" in message
    assert "README.md" in message and "subfolders (not searched): series-1" in message
    with pytest.raises(InputError, match=r"DICOM folder .*absent does not exist"):
        read_dicom_series(tmp_path / "absent")
