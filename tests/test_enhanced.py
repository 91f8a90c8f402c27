"""Enhanced CT: a Legacy Converted Enhanced CT written with highdicom from the real
ct-dicom-20 series (cropped in-plane to 64 x 64) gives the classic series' volume
and vectors; frames out of order and per-frame rescale against pydicom alone; and
what SimpleITK/GDCM gets wrong with them (why highdicom reads these files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813

from cohort.errors import GeometryError, InputError
from cohort.inputs.dicom import read_dicom_series
from cohort.inputs.enhanced import read_enhanced
from cohort.inputs.stages import Stages
from cohort.inputs.volume import volume_from_sitk
from cohort.model.hooks import FeatureExtractor
from tests import dicom_objects as objects
from tests.dicom_fixtures import CFG, VALUES, built
from tests.test_input_kinds import assert_same_vectors, extractor, vectors

pytestmark = pytest.mark.timeout(300)

__all__ = ["built", "extractor"]  # shared fixtures, used by name


def pydicom_frames(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU (column, row, slice) with slices in increasing z, and their z, by pydicom alone:
    each frame's position and rescale from its own functional groups, else the shared."""
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    hu, z = [], []
    for stored, group in zip(ds.pixel_array, ds.PerFrameFunctionalGroupsSequence, strict=True):
        rescale = group if "PixelValueTransformationSequence" in group else shared
        item = rescale.PixelValueTransformationSequence[0]
        hu.append((stored * float(item.RescaleSlope) + float(item.RescaleIntercept)).T)
        z.append(float(group.PlanePositionSequence[0].ImagePositionPatient[2]))
    order = np.argsort(z)
    return np.stack([hu[n] for n in order], axis=-1), np.asarray(z)[order]


def test_enhanced_ct_gives_the_series_volume_and_vectors(
    built: dict[str, Path], extractor: FeatureExtractor
) -> None:
    series = read_dicom_series(built["series"])
    enhanced = read_enhanced(built["enhanced"])
    np.testing.assert_array_equal(enhanced.data, series.data)
    np.testing.assert_allclose(enhanced.affine, series.affine, rtol=0, atol=1e-6)
    assert enhanced.description.startswith("Enhanced CT ") and "(20 frames)" in enhanced.description
    assert enhanced.identity is not None
    assert enhanced.identity.frame_of_reference_uid == objects.uid("for")
    # the NIfTI label map: the SEG names the classic series, so the Enhanced CT (a series
    # of its own) would be refused with it (tests/test_dicom_seg.py has that rule)
    by_folder = Stages(VALUES, CFG).prepared(built["enhanced"].parent, built["labels"], True)
    by_file = Stages(VALUES, CFG).prepared(built["enhanced"], built["labels"], True)
    reference = Stages(VALUES, CFG).prepared(built["series"], built["labels"], True)
    assert_same_vectors(vectors(extractor, by_folder), vectors(extractor, reference))
    np.testing.assert_array_equal(by_file.image, reference.image)


def test_frames_out_of_order_and_per_frame_rescale_match_pydicom(
    built: dict[str, Path], tmp_path: Path
) -> None:
    order = np.random.default_rng(3).permutation(20).tolist()
    edited = objects.edit_enhanced(
        built["enhanced"], tmp_path / "edited.dcm", order=order, slopes={4: 0.5, 11: 2.0}
    )
    volume = read_enhanced(edited)
    hu, z = pydicom_frames(edited)
    np.testing.assert_array_equal(volume.data, hu.astype(np.float32))
    assert np.any(volume.data % 1 == 0.5)  # a halved frame kept its own rescale
    slices = np.stack([np.zeros(20), np.zeros(20), np.arange(20), np.ones(20)])
    np.testing.assert_allclose((volume.affine @ slices)[2], z)  # z is the same in RAS and LPS


def test_simpleitk_gdcm_reads_such_files_wrongly(built: dict[str, Path], tmp_path: Path) -> None:
    order = np.random.default_rng(3).permutation(20).tolist()
    edited = objects.edit_enhanced(
        built["enhanced"], tmp_path / "edited.dcm", order=order, slopes={4: 0.5}
    )
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(edited))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    gdcm = volume_from_sitk(reader.Execute(), edited, "GDCM")
    hu, _ = pydicom_frames(edited)
    assert not np.array_equal(gdcm.data, hu) and not np.array_equal(gdcm.data[:, :, ::-1], hu)
    assert not np.any(gdcm.data % 1 == 0.5)  # one rescale for every frame
    assert abs(abs(float(gdcm.affine[2, 2])) - 2.0) > 0.1  # spacing from the first two frames


def test_a_missing_frame_is_named(built: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(built["enhanced"])
    keep = [n for n in range(20) if n != 7]
    frames = ds.pixel_array[keep]
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[n] for n in keep]
    ds.NumberOfFrames = 19
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    path = tmp_path / "gap.dcm"
    ds.save_as(path)
    with pytest.raises(GeometryError) as info:
        read_enhanced(path)
    message = str(info.value)
    assert "a gap of 4 mm where the other slices are 2 mm apart: a missing slice" in message
    assert "frame 7 of file gap.dcm" in message and "convert it with dcm2niix" in message


def test_a_multi_frame_object_that_is_not_ct_says_what_it_is(
    built: dict[str, Path], tmp_path: Path
) -> None:
    ds = pydicom.dcmread(built["enhanced"])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"is a DICOM Enhanced MR Image Storage .*dcm2niix"):
        read_enhanced(path)


def test_an_enhanced_ct_beside_slices_of_its_series_is_refused(
    built: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(built["series"], folder)
    ds = pydicom.dcmread(built["enhanced"])
    ds.SeriesInstanceUID = objects.uid("series")  # the classic series' UID
    ds.save_as(folder / "enhanced.dcm")
    with pytest.raises(InputError, match=r"holds 20 frames .* beside 20 other file"):
        read_dicom_series(folder)
