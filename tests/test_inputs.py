"""Volumes: loading, grid checks, orientation, resampling, cropping, window, regions.

Fixtures are tiny synthetic volumes with hand-countable answers; the knee-3702
tests use the two real masks (real LPS header) with synthetic HU on their grid.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.config import LabelMap, PreprocessConfig
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.geometry import check_pair
from cohort.inputs.preprocess import (
    NO_REGION,
    Prepared,
    air_value,
    preprocess_pair,
    window_normalise,
)
from cohort.inputs.readers import VolumePair, load_pair
from cohort.inputs.segmentation import LabelRegions
from cohort.inputs.stages import prepare
from cohort.inputs.volume import Volume
from tests.nifti_helpers import lps_from_ras, save_nifti, save_pair, zyx_from_xyz

LABELS: LabelMap = (("tibia", 1), ("femur", 2))
CFG = PreprocessConfig()
# Window [0, 1000] HU, mean 0, std 1: the model input is HU / 1000, easy to check by hand.
PLAIN = PreprocessConfig(hu_min=0.0, hu_max=1000.0, mean=0.0, std=1.0)
KNEE = Path(__file__).resolve().parents[2] / "shared" / "data" / "knee-3702"


def cube_anatomy() -> tuple[np.ndarray, np.ndarray]:
    """A 20^3 RAS volume (x, y, z): tibia = 10^3 cube, femur = 2x3x4 box, HU not symmetric."""
    x, y, z = np.meshgrid(np.arange(20), np.arange(20), np.arange(20), indexing="ij")
    hu = (-1000 + 7 * x + 31 * y + 101 * z).astype(np.float32)  # every voxel different
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 2:12] = 1
    mask[2:4, 15:18, 14:18] = 2
    return hu, mask


@pytest.fixture
def ras_files(tmp_path: Path) -> tuple[Path, Path]:
    hu, mask = cube_anatomy()
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    affine[:3, 3] = (-12.0, 30.0, 100.0)
    return (
        save_nifti(tmp_path / "img.nii.gz", hu, affine),
        save_nifti(tmp_path / "seg.nii.gz", mask, affine),
    )


def in_memory(
    hu: np.ndarray, image_affine: np.ndarray, mask: np.ndarray, mask_affine: np.ndarray
) -> VolumePair:
    """A loaded pair without files: an image and a label map, each with its affine."""
    image = Volume(hu, image_affine, Path("i"), "image")
    return VolumePair(image, LabelRegions(mask, LABELS, mask_affine, Path("m")))


def assert_same(a: Prepared, b: Prepared) -> None:
    assert a.image.shape == b.image.shape
    assert float(np.max(np.abs(a.image - b.image))) <= 1e-5
    np.testing.assert_array_equal(a.region_index, b.region_index)
    assert (a.region_names, a.voxels, a.spacing_mm) == (b.region_names, b.voxels, b.spacing_mm)


# ------------------------------------------------------------ regions, counts


def test_cube_region_counts_and_names(ras_files: tuple[Path, Path]) -> None:
    prepared = prepare(*ras_files, LABELS, True, CFG)
    assert prepared.region_names == ("tibia", "femur", "background")
    assert prepared.voxels == (1000, 24, 8000 - 1000 - 24)
    assert prepared.image.dtype == np.float32
    assert prepared.region_index.dtype == np.uint8
    assert prepared.image.shape == (20, 20, 20)
    assert prepared.spacing_mm == (1.0, 0.5, 0.5)
    assert prepared.original_orientation == "RAS"


def test_background_off_leaves_no_region_marker(ras_files: tuple[Path, Path]) -> None:
    prepared = prepare(*ras_files, LABELS, False, CFG)
    assert prepared.region_names == ("tibia", "femur")
    assert prepared.voxels == (1000, 24)
    assert int(np.count_nonzero(prepared.region_index == NO_REGION)) == 8000 - 1024


def test_unnamed_label_counts_as_background(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    mask[0:2, 0:2, 0:2] = 7  # a label the map does not name: 8 voxels
    prepared = prepare(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask), LABELS, True, CFG
    )
    assert prepared.voxels == (1000, 24, 8000 - 1024)


def test_label_map_order_sets_region_order(ras_files: tuple[Path, Path]) -> None:
    prepared = prepare(*ras_files, (("femur", 2), ("tibia", 1)), True, CFG)
    assert prepared.region_names == ("femur", "tibia", "background")
    assert prepared.voxels == (24, 1000, 6976)


# ------------------------------------------------------- orientation and axes


@pytest.mark.parametrize(
    ("restore", "orientation"), [(lps_from_ras, "LPS"), (zyx_from_xyz, "SAR")], ids=["lps", "zyx"]
)
def test_storage_order_gives_identical_results(
    restore: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    orientation: str,
    tmp_path: Path,
) -> None:
    """The same anatomy stored RAS and stored flipped (LPS) or with axes permuted (z, y, x)."""
    hu, mask = cube_anatomy()
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    other_hu, other_affine = restore(hu, affine)
    other_mask, _ = restore(mask, affine)
    ras = prepare(*save_pair(tmp_path, hu, mask, affine, stem="r"), LABELS, True, CFG)
    other = prepare(*save_pair(tmp_path, other_hu, other_mask, other_affine), LABELS, True, CFG)
    assert (ras.original_orientation, other.original_orientation) == ("RAS", orientation)
    assert_same(ras, other)


def test_float32_and_scaled_int16_storage_give_identical_results(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    raw = ((hu + 1024.0) * 2.0).astype(np.int16)  # hu = raw * 0.5 - 1024 exactly
    as_float = prepare(
        save_nifti(tmp_path / "f.nii.gz", hu),
        save_nifti(tmp_path / "m.nii.gz", mask),
        LABELS,
        True,
        CFG,
    )
    as_int = prepare(
        save_nifti(tmp_path / "i.nii.gz", raw, slope=0.5, inter=-1024.0),
        tmp_path / "m.nii.gz",
        LABELS,
        True,
        CFG,
    )
    assert_same(as_float, as_int)


def test_marker_lands_at_superior_anterior_left(tmp_path: Path) -> None:
    # RAS storage, shape (x=6, y=7, z=8); voxel x=1 (near left), y=5 (anterior), z=6 (superior)
    hu = np.zeros((6, 7, 8), dtype=np.float32)
    hu[1, 5, 6] = 500.0
    mask = np.zeros((6, 7, 8), dtype=np.uint8)
    mask[1, 5, 6] = 1
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    expected = np.zeros((8, 7, 6), dtype=np.float32)  # (D=z, H=y, W=x)
    expected[6, 5, 1] = 0.5
    lps_hu, lps_affine = lps_from_ras(hu, affine)
    lps_mask, _ = lps_from_ras(mask, affine)
    assert lps_hu[6 - 1 - 1, 7 - 1 - 5, 6] == 500.0  # where the marker is stored in LPS
    pairs = {"ras": (hu, mask, affine), "lps": (lps_hu, lps_mask, lps_affine)}
    for name, (image_data, mask_data, aff) in pairs.items():
        prepared = prepare(
            save_nifti(tmp_path / f"{name}_i.nii", image_data, aff),
            save_nifti(tmp_path / f"{name}_m.nii", mask_data, aff),
            (("marker", 1),),
            False,
            PLAIN,
        )
        assert prepared.image.shape == (8, 7, 6)
        assert prepared.spacing_mm == (3.0, 2.0, 1.0)
        np.testing.assert_allclose(prepared.image, expected, atol=1e-7)
        assert np.argwhere(prepared.region_index == 0).tolist() == [[6, 5, 1]]


# ---------------------------------------------------------- window, normalise


def test_window_and_normalise_exact() -> None:
    hu = np.array([-3000.0, -1000.0, 500.0, 2000.0, 2500.0], dtype=np.float32)
    scaled = np.array([0.0, 0.0, 0.5, 1.0, 1.0])  # clip to [-1000, 2000], then / 3000
    expected = (scaled - 0.449) / 0.226
    np.testing.assert_allclose(window_normalise(hu, CFG), expected, atol=1e-6)
    assert window_normalise(hu, CFG).dtype == np.float32


def test_air_value_is_normalised_window_low_end() -> None:
    assert air_value(CFG) == pytest.approx(-0.449 / 0.226, abs=1e-12)
    low = window_normalise(np.array([CFG.hu_min], dtype=np.float32), CFG)
    assert float(low[0]) == pytest.approx(air_value(CFG), abs=1e-6)


def test_window_applies_through_prepare(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    hu[:] = 1500.0
    hu[0, 0, 0] = -2000.0  # stored (x, y, z) = (0, 0, 0) -> (D, H, W) = (0, 0, 0)
    prepared = prepare(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask), LABELS, True, CFG
    )
    assert float(prepared.image[0, 0, 0]) == pytest.approx((0.0 - 0.449) / 0.226, abs=1e-6)
    assert float(prepared.image[5, 5, 5]) == pytest.approx((2500 / 3000 - 0.449) / 0.226, abs=1e-6)


# ------------------------------------------------------------------ resampling


def test_resampling_halves_shape_and_samples_linearly(tmp_path: Path) -> None:
    # 20^3 at 1 mm; HU = 10 * z (z = superior index = D). Target 2 mm.
    z = np.arange(20, dtype=np.float32)
    hu = np.broadcast_to(10.0 * z, (20, 20, 20)).copy()
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    cfg = PreprocessConfig(hu_min=0.0, hu_max=1000.0, mean=0.0, std=1.0, target_spacing=(2, 2, 2))
    prepared = prepare(*save_pair(tmp_path, hu, mask), (("bone", 1),), True, cfg)
    assert prepared.image.shape == (10, 10, 10)
    assert prepared.spacing_mm == (2.0, 2.0, 2.0)
    # output voxel i covers input voxels 2i, 2i+1: its centre is input index 2i + 0.5
    expected_d = 10.0 * (2 * np.arange(10) + 0.5) / 1000.0
    np.testing.assert_allclose(prepared.image[:, 4, 4], expected_d, atol=1e-6)
    # nearest: output i takes input voxel 2i + 1; inside 5..14 for i = 2..6 -> 5^3 voxels
    assert prepared.voxels == (125, 1000 - 125)


def test_resampling_anisotropic_target(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()  # spacing 1 mm; D = z
    cfg = PreprocessConfig(target_spacing=(4.0, 1.0, 0.5))
    prepared = prepare(*save_pair(tmp_path, hu, mask), (("tibia", 1),), True, cfg)
    assert prepared.image.shape == (5, 20, 40)
    assert prepared.spacing_mm == (4.0, 1.0, 0.5)
    # tibia z 2..11: output d takes input 4d + 2 -> d = 0, 1, 2 (inputs 2, 6, 10): 3 slices;
    # H unchanged 10; W at 0.5 mm: input x 5..14 -> 20 outputs
    assert prepared.voxels[0] == 3 * 10 * 20


def test_region_lost_by_resampling_is_a_region_error(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    mask[4, 4, 16] = 3  # one voxel at even indices: halving samples odd indices only
    cfg = PreprocessConfig(target_spacing=(2.0, 2.0, 2.0))
    with pytest.raises(RegionError, match=r"region 'dot' of mask .*m\.nii\.gz has no voxels"):
        prepare(*save_pair(tmp_path, hu, mask), (("tibia", 1), ("dot", 3)), True, cfg)


# -------------------------------------------------------------------- cropping


@pytest.mark.parametrize(
    ("margin", "side"),
    [(0.0, 10), (2.0, 14), (1.5, 14), (4.99, 20), (100.0, 20)],
)
def test_crop_margin_exact(tmp_path: Path, margin: float, side: int) -> None:
    # 1 mm voxels, cube at 5..14 on every axis; margin rounds up to whole voxels, clipped
    hu = np.zeros((20, 20, 20), dtype=np.float32)
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    prepared = prepare(
        *save_pair(tmp_path, hu, mask),
        (("bone", 1),),
        False,
        PreprocessConfig(crop_margin_mm=margin),
    )
    assert prepared.image.shape == (side, side, side)
    assert prepared.voxels == (1000,)


def test_crop_margin_in_mm_per_axis(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()  # tibia x 5..14, y 5..14, z 2..11; femur x 2..3, y 15..17, z 14..17
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    prepared = prepare(
        save_nifti(tmp_path / "i.nii", hu, affine),
        save_nifti(tmp_path / "m.nii", mask, affine),
        LABELS,
        True,
        PreprocessConfig(crop_margin_mm=3.0),
    )
    # margin voxels: z ceil(3/2) = 2, y 3, x ceil(3/0.5) = 6
    # box z 2..17 -> 0..19 (20); y 5..17 -> 2..19 (18, clipped at 19); x 2..14 -> 0..19 (20)
    assert prepared.image.shape == (20, 18, 20)
    assert prepared.voxels == (1000, 24, 20 * 18 * 20 - 1024)


def test_crop_to_labels_without_margin_empties_background(tmp_path: Path) -> None:
    hu = np.zeros((20, 20, 20), dtype=np.float32)
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    with pytest.raises(RegionError, match="'background'"):
        prepare(
            *save_pair(tmp_path, hu, mask),
            (("bone", 1),),
            True,
            PreprocessConfig(crop_margin_mm=0.0),
        )


# --------------------------------------------------------------- bad inputs


def test_missing_file(ras_files: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"image file .*absent\.nii\.gz does not exist"):
        load_pair(tmp_path / "absent.nii.gz", ras_files[1], CFG)
    with pytest.raises(InputError, match=r"mask file .*absent\.nii does not exist"):
        load_pair(ras_files[0], tmp_path / "absent.nii", CFG)


@pytest.mark.parametrize("name", ["junk.nii", "junk.nii.gz", "junk.txt"])
def test_not_a_nifti(ras_files: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    junk = tmp_path / name
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match=rf"image file .*{re.escape(name)} is not"):
        load_pair(junk, ras_files[1], CFG)


@pytest.mark.parametrize("name", ["img.nii.gz", "img.nii"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    hu, mask = cube_anatomy()
    whole = save_nifti(tmp_path / name, hu).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=rf"image file .*cut_{re.escape(name)}.*trunc"):
        load_pair(cut, save_nifti(tmp_path / "m.nii", mask), CFG)


def test_shape_mismatch(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask[:, :, :19]), CFG
    )
    with pytest.raises(
        GeometryError,
        match=r"mask grid 19x20x20 \(.*m\.nii\).*image grid 20x20x20.*--mask-resample nearest",
    ):
        check_pair(pair, LABELS, CFG)


def test_affine_mismatch_beyond_tolerance(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    shifted = np.eye(4)
    shifted[0, 3] = 0.01  # 10 micrometres > 1e-3 mm
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask, shifted), CFG
    )
    with pytest.raises(GeometryError, match=r"m\.nii.*i\.nii.*0\.01 mm.*resample the mask"):
        check_pair(pair, LABELS, CFG)


def test_affine_difference_within_tolerance_passes(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    nudged = np.eye(4)
    nudged[0, 0] = 1.0 + 2e-5  # the far corner voxel (19 voxels along x) moves 3.8e-4 mm
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask, nudged), CFG
    )
    check_pair(pair, LABELS, CFG)


def test_grids_are_compared_at_their_corner_voxels_not_entry_by_entry(tmp_path: Path) -> None:
    """A voxel size 1e-4 mm larger is within 1e-3 mm in every affine entry, but over the
    grid it adds up: the far corner voxel of a 20-voxel axis lies 1.9e-3 mm away."""
    hu, mask = cube_anatomy()
    assert hu.shape[0] == 20  # the arithmetic below
    nudged = np.eye(4)
    nudged[0, 0] = 1.0 + 1e-4
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask, nudged), CFG
    )
    with pytest.raises(GeometryError, match=r"up to 0\.0019\d* mm"):
        check_pair(pair, LABELS, CFG)


def test_mask_stored_flipped_over_the_same_grid_is_the_same_pair(tmp_path: Path) -> None:
    """Stored affines differ by up to 19 mm, the physical grid is the same: accepted."""
    hu, mask = cube_anatomy()
    lps_mask, lps_affine = lps_from_ras(mask, np.eye(4))
    image = save_nifti(tmp_path / "i.nii", hu)
    flipped = prepare(
        image, save_nifti(tmp_path / "m.nii", lps_mask, lps_affine), LABELS, True, CFG
    )
    alike = prepare(image, save_nifti(tmp_path / "r.nii", mask), LABELS, True, CFG)
    assert_same(flipped, alike)


def test_non_integer_mask(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    soft = mask.astype(np.float32)
    soft[0, 0, 0] = 0.5
    with pytest.raises(InputError, match=r"mask file .*m\.nii has 1 non-integer voxel values"):
        load_pair(save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", soft), CFG)


def test_float_mask_with_whole_values_is_accepted(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu),
        save_nifti(tmp_path / "m.nii", mask.astype(np.float32)),
        CFG,
    )
    assert isinstance(pair.regions, LabelRegions)
    assert np.issubdtype(pair.regions.labels.dtype, np.integer)
    np.testing.assert_array_equal(pair.regions.labels, mask)


def test_absent_label_names_label_value_and_present_values(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    pair = load_pair(save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask), CFG)
    with pytest.raises(RegionError) as info:
        check_pair(pair, (("tibia", 1), ("patella", 5)), CFG)
    message = str(info.value)
    assert "m.nii" in message
    assert "value 5 (label 'patella')" in message
    assert "values present: 0, 1, 2" in message
    assert "`labels` map in the manifest" in message


@pytest.mark.parametrize(("bad", "count"), [([np.nan], 1), ([np.inf, -np.inf], 2)])
def test_non_finite_image(tmp_path: Path, bad: list[float], count: int) -> None:
    hu, mask = cube_anatomy()
    hu.ravel()[: len(bad)] = bad
    pair = load_pair(save_nifti(tmp_path / "i.nii", hu), save_nifti(tmp_path / "m.nii", mask), CFG)
    with pytest.raises(InputError, match=rf"image file .*i\.nii has {count} NaN or infinite"):
        check_pair(pair, LABELS, CFG)


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 1), (20, 20, 20, 2)])
def test_image_not_3d(tmp_path: Path, shape: tuple[int, ...]) -> None:
    _, mask = cube_anatomy()
    image = save_nifti(tmp_path / "i.nii", np.zeros(shape, dtype=np.float32))
    with pytest.raises(GeometryError, match=r"image file .*i\.nii has shape .*3D volume"):
        load_pair(image, save_nifti(tmp_path / "m.nii", mask), CFG)


def test_trailing_singleton_4d_is_squeezed(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    pair = load_pair(
        save_nifti(tmp_path / "i.nii", hu[..., np.newaxis]),
        save_nifti(tmp_path / "m.nii", mask),
        CFG,
    )
    assert pair.image.shape == (20, 20, 20)
    np.testing.assert_array_equal(pair.image.data, hu)


def test_absurd_size_refused_from_header_before_reading(tmp_path: Path) -> None:
    hu, mask = cube_anatomy()
    whole = save_nifti(tmp_path / "i.nii", hu).read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole[:400])  # header intact, data gone: only a header check can pass
    with pytest.raises(InputError, match=r"cut\.nii has 20x20x20 = 8,000 voxels.*limit of 7,999"):
        load_pair(cut, save_nifti(tmp_path / "m.nii", mask), PreprocessConfig(max_voxels=7999))


def test_load_keeps_original_affines_and_scaled_hu(tmp_path: Path) -> None:
    raw = np.arange(27, dtype=np.int16).reshape(3, 3, 3)
    affine = np.diag([-0.75, -0.75, 2.0, 1.0])  # exact in the header's float32
    pair = load_pair(
        save_nifti(tmp_path / "i.nii.gz", raw, affine, slope=2.0, inter=-100.0),
        save_nifti(tmp_path / "m.nii.gz", np.ones((3, 3, 3), dtype=np.uint8), affine),
        CFG,
    )
    np.testing.assert_array_equal(pair.image.affine, affine)
    np.testing.assert_array_equal(pair.regions.affine, affine)
    assert pair.image.data.dtype == np.float32
    np.testing.assert_array_equal(pair.image.data, raw * 2.0 - 100.0)


# ------------------------------------------------------ real data: knee-3702


@pytest.fixture(scope="module")
def knee_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic HU on seg_a's grid: 700 HU where seg_a labels bone, 40 HU elsewhere."""
    if not (KNEE / "seg_a.nii.gz").is_file():  # a checkout without ../shared/data
        pytest.skip(f"real data not found at {KNEE}")
    seg = nib.load(KNEE / "seg_a.nii.gz")
    raw = np.where(np.asarray(seg.dataobj) > 0, np.uint8(170), np.uint8(104))
    path = tmp_path_factory.mktemp("knee") / "image.nii"
    return save_nifti(path, raw, seg.affine, slope=10.0, inter=-1000.0)  # HU = 10 raw - 1000


def mean_d(prepared: Prepared, region: int) -> float:
    per_slice = np.count_nonzero(prepared.region_index == region, axis=(1, 2))
    return float(np.sum(per_slice * np.arange(per_slice.size)) / np.sum(per_slice))


@pytest.mark.parametrize(
    ("seg", "labels", "tibia_voxels"),
    [
        ("seg_a.nii.gz", (("tibia", 1), ("femur", 2)), 96_631),
        ("seg_b.nii.gz", (("tibia", 2), ("femur", 1)), 245_349),
    ],
)
def test_knee_real_lps_header_tibia_inferior_counts(
    knee_image: Path, seg: str, labels: LabelMap, tibia_voxels: int
) -> None:
    if not (KNEE / seg).is_file():
        pytest.skip(f"real data not found at {KNEE}")
    prepared = prepare(knee_image, KNEE / seg, labels, True, PreprocessConfig(crop_margin_mm=10.0))
    assert prepared.original_orientation == "LPS"
    assert prepared.region_names == ("tibia", "femur", "background")
    assert prepared.voxels[0] == tibia_voxels
    assert prepared.spacing_mm == pytest.approx((2.0, 0.869140983, 0.869140983))
    assert mean_d(prepared, 0) < mean_d(prepared, 1)  # tibia below femur


def test_knee_wrong_label_map_puts_tibia_above_femur(knee_image: Path) -> None:
    """seg_b read with seg_a's numbering: the 'tibia' is superior, which is how a user spots it."""
    if not (KNEE / "seg_b.nii.gz").is_file():
        pytest.skip(f"real data not found at {KNEE}")
    prepared = prepare(
        knee_image, KNEE / "seg_b.nii.gz", LABELS, False, PreprocessConfig(crop_margin_mm=0.0)
    )
    assert prepared.voxels == (244_063, 245_349)
    assert mean_d(prepared, 0) > mean_d(prepared, 1)


# ---------------------------------------------------------- properties


def stored_as(
    data: np.ndarray, affine: np.ndarray, order: tuple[int, ...], flips: tuple[bool, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored with axis k = RAS axis order[k], reversed where flips[k].

    Stored index j maps to RAS index i with i[order[k]] = j[k], or n - 1 - j[k] when flipped.
    """
    stored = data.transpose(order)
    to_ras = np.zeros((4, 4))
    to_ras[3, 3] = 1.0
    for k, (axis, flip) in enumerate(zip(order, flips, strict=True)):
        if flip:
            stored = np.flip(stored, axis=k)
            to_ras[axis, k] = -1.0
            to_ras[axis, 3] = data.shape[axis] - 1.0
        else:
            to_ras[axis, k] = 1.0
    return np.ascontiguousarray(stored), affine @ to_ras


@settings(max_examples=25, deadline=None)
@given(
    order=st.permutations([0, 1, 2]),
    flips=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_any_axis_order_and_flip_gives_the_ras_result(
    order: list[int], flips: tuple[bool, bool, bool]
) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1200.0, 2200.0, size=(4, 5, 6)).astype(np.float32)
    mask = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    affine = np.diag([0.7, 0.9, 1.3, 1.0])
    reference = preprocess_pair(in_memory(hu, affine, mask, affine), LABELS, True, CFG)
    s_hu, s_affine = stored_as(hu, affine, tuple(order), flips)
    s_mask, _ = stored_as(mask, affine, tuple(order), flips)
    other = preprocess_pair(in_memory(s_hu, s_affine, s_mask, s_affine), LABELS, True, CFG)
    assert_same(reference, other)
    assert reference.image.shape == (6, 5, 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e5, 1e5, width=32), min_size=1, max_size=50))
def test_window_output_stays_in_normalised_range(values: list[float]) -> None:
    out = window_normalise(np.array(values, dtype=np.float32), CFG)
    high = (1.0 - CFG.mean) / CFG.std
    assert float(out.min()) >= air_value(CFG) - 1e-6
    assert float(out.max()) <= high + 1e-6
