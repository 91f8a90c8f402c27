"""DICOM SEG masks, written with highdicom from the real ct-dicom-20 series (cropped
in-plane to 64 x 64): the same regions as a NIfTI label map give the same vectors,
and each of the README's cases behaves as it says."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cohort.config import LabelMap
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.geometry import dhw_grid, mask_resampled, same_grid
from cohort.inputs.readers import load_pair
from cohort.inputs.stages import Stages
from cohort.model.hooks import FeatureExtractor
from tests import dicom_objects as objects
from tests.dicom_fixtures import CFG, NAMES, NEAREST, VALUES, built, datasets, labels, masks_of
from tests.test_input_kinds import assert_same_vectors, extractor, vectors

pytestmark = pytest.mark.timeout(300)

__all__ = ["built", "datasets", "extractor", "labels"]  # shared fixtures, used by name


def test_seg_gives_the_label_map_vectors(
    built: dict[str, Path], extractor: FeatureExtractor
) -> None:
    reference = Stages(VALUES, CFG).prepared(built["series"], built["labels"], True)
    seg = Stages(NAMES, CFG).prepared(built["series"], built["seg"], True)
    assert seg.region_names == reference.region_names == ("bone", "soft", "background")
    np.testing.assert_array_equal(seg.region_index, reference.region_index)
    assert_same_vectors(vectors(extractor, seg), vectors(extractor, reference))


def test_seg_on_a_nifti_image_is_placed_by_positions(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    image = load_pair(built["series"], built["labels"], CFG, VALUES).image
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image.data, image.affine), nifti)  # no UIDs to compare
    masks = masks_of(nifti, built["seg"], NAMES)
    np.testing.assert_array_equal(masks["bone"], labels == 1)
    np.testing.assert_array_equal(masks["soft"], labels == 2)


def test_frames_out_of_order_are_placed_by_their_positions(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    frames = int(pydicom.dcmread(built["seg"], stop_before_pixels=True).NumberOfFrames)
    order = np.random.default_rng(7).permutation(frames).tolist()
    shuffled = objects.reorder_seg_frames(built["seg"], tmp_path / "shuffled.dcm", order)
    z = [
        float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        for group in pydicom.dcmread(shuffled).PerFrameFunctionalGroupsSequence
    ]
    assert z != sorted(z) and z != sorted(z, reverse=True)  # the frames really are shuffled
    masks = masks_of(built["series"], shuffled, NAMES)
    np.testing.assert_array_equal(masks["bone"], labels == 1)
    np.testing.assert_array_equal(masks["soft"], labels == 2)


def test_overlapping_segments_each_keep_their_voxels_and_frames_cover_some_slices(
    built: dict[str, Path],
    datasets: list[pydicom.Dataset],
    labels: np.ndarray,
    tmp_path: Path,
    extractor: FeatureExtractor,
) -> None:
    box = np.zeros(labels.shape, dtype=bool)
    box[10:40, 20:50, 6:11] = True  # overlaps bone and soft, on 5 of the 20 slices
    path = objects.write_seg(datasets, {"bone": labels == 1, "box": box}, tmp_path / "o.dcm")
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 20 + 5
    names: LabelMap = (("bone", None), ("box", None))
    masks = masks_of(built["series"], path, names)
    np.testing.assert_array_equal(masks["bone"], labels == 1)
    np.testing.assert_array_equal(masks["box"], box)
    assert np.any(masks["bone"] & masks["box"])
    prepared = Stages(names, CFG).prepared(built["series"], path, True)
    background = prepared.region_names.index("background")
    # the background is every voxel in neither segment, counted from the arrays
    assert int(np.count_nonzero(prepared.region_index == background)) == int(
        np.count_nonzero(~((labels == 1) | box))
    )
    pooled = vectors(extractor, prepared)
    assert {region for region, _ in pooled} == {"bone", "box", "background"}


def test_a_segment_with_no_frames_is_empty_and_an_error_only_when_named(
    built: dict[str, Path], datasets: list[pydicom.Dataset], labels: np.ndarray, tmp_path: Path
) -> None:
    empty = np.zeros(labels.shape, dtype=bool)
    path = objects.write_seg(datasets, {"bone": labels == 1, "empty": empty}, tmp_path / "e.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["bone", "empty"]
    assert {
        int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for g in ds.PerFrameFunctionalGroupsSequence
    } == {1}  # no frame of segment 2
    bone = masks_of(built["series"], path, (("bone", None),))
    np.testing.assert_array_equal(bone["bone"], labels == 1)
    with pytest.raises(RegionError, match=r"segment 2 'empty', no frames in the SEG.*no voxels"):
        masks_of(built["series"], path, (("bone", None), ("empty", None)))


def test_fractional_segments_are_the_voxels_at_least_half_in(
    built: dict[str, Path], datasets: list[pydicom.Dataset], labels: np.ndarray, tmp_path: Path
) -> None:
    fraction = np.zeros(labels.shape, dtype=np.float32)
    fraction[labels == 1] = 0.8
    fraction[labels == 2] = 0.4  # under half: out
    fraction[5:9, 5:9, 3] = 0.5  # exactly half (128 of 255 after rounding: in)
    path = objects.write_seg(datasets, {"f": fraction}, tmp_path / "f.dcm", fractional=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).SegmentationType == "FRACTIONAL"
    expected = (labels == 1).copy()
    expected[5:9, 5:9, 3] = True
    np.testing.assert_array_equal(masks_of(built["series"], path, (("f", None),))["f"], expected)


def test_seg_of_another_series_names_both_uids_unless_nearest_allows_it(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    other = objects.cropped_series(tmp_path / "other", series="other-series")
    path = objects.write_seg(other, {"bone": labels == 1}, tmp_path / "other-seg.dcm")
    image_uid = objects.uid("series")
    with pytest.raises(GeometryError) as info:
        masks_of(built["series"], path, (("bone", None),))
    message = str(info.value)
    assert objects.uid("other-series") in message and image_uid in message
    assert "--mask-resample nearest" in message and "whose grid it lies on" in message
    masks = masks_of(built["series"], path, (("bone", None),), NEAREST)  # same grid: allowed
    np.testing.assert_array_equal(masks["bone"], labels == 1)


def test_seg_of_another_frame_of_reference_off_the_grid_is_refused_even_with_nearest(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    other = objects.cropped_series(tmp_path / "moved", series="moved", frame_of_reference="f2")
    for ds in other:  # the same pixels half a voxel to the side
        ds.ImagePositionPatient = [
            float(ds.ImagePositionPatient[0]) + 0.4,
            *ds.ImagePositionPatient[1:],
        ]
    path = objects.write_seg(other, {"bone": labels == 1}, tmp_path / "moved-seg.dcm")
    with pytest.raises(GeometryError) as info:
        masks_of(built["series"], path, (("bone", None),), NEAREST)
    message = str(info.value)
    assert objects.uid("f2") in message and objects.uid("for") in message
    assert "does not lie on this image's grid either" in message


def test_seg_off_the_image_lattice_follows_the_mask_resample_rule(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    image = load_pair(built["series"], built["labels"], CFG, VALUES).image
    shifted = image.affine.copy()
    shifted[:3, 3] += shifted[:3, 0] * 0.25  # a quarter voxel along the columns
    nifti = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(image.data, shifted), nifti)
    stages = Stages((("bone", None),), CFG)
    with pytest.raises(GeometryError, match=r"--mask-resample nearest"):
        stages.checked(nifti, built["seg"])
    pair = Stages((("bone", None),), NEAREST).checked(nifti, built["seg"])
    own = dhw_grid(pair.regions.shape, pair.regions.affine)  # the SEG's own grid, kept
    assert same_grid(own, dhw_grid(image.shape, image.affine), 1e-6)
    assert mask_resampled(pair, NEAREST)


def test_a_folder_holding_the_seg_and_a_file_without_the_dcm_name_are_read_by_content(
    built: dict[str, Path], labels: np.ndarray, tmp_path: Path
) -> None:
    folder = tmp_path / "seg-series"
    folder.mkdir()
    (folder / "1.2.3.4").write_bytes(built["seg"].read_bytes())  # no suffix: by content
    masks = masks_of(built["series"], folder, NAMES)
    np.testing.assert_array_equal(masks["soft"], labels == 2)
    masks = masks_of(built["series"], folder / "1.2.3.4", NAMES)
    np.testing.assert_array_equal(masks["bone"], labels == 1)


def test_a_ct_slice_as_the_mask_names_what_it_is(built: dict[str, Path]) -> None:
    slice_file = next(built["series"].iterdir())
    with pytest.raises(InputError, match=r"is a DICOM CT Image Storage .* not a segmentation"):
        masks_of(built["series"], slice_file, NAMES)


def test_labels_must_be_bare_segment_labels(built: dict[str, Path]) -> None:
    with pytest.raises(InputError, match=r"names its regions by SegmentLabel.*'bone,soft'"):
        masks_of(built["series"], built["seg"], VALUES)
    with pytest.raises(RegionError, match=r"no region 'liver'; regions \(SegmentLabel\): 'bone'"):
        masks_of(built["series"], built["seg"], (("liver", None),))
