"""NRRD and MetaImage volumes, mask folders and 3D Slicer segmentations.

Every NRRD/MHA file here is written by the test from arrays: through
SimpleITK with the LPS geometry worked out in the test (not by the code under
test), or as a hand-written NRRD header + raw bytes where SimpleITK cannot
write what real files hold (Slicer's layered segmentations, a RAS space).
Answers are exact on tiny volumes.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.geometry import to_dhw
from cohort.inputs.itk import read_itk_image, read_itk_label_map
from cohort.inputs.segmentation import (
    LabelRegions,
    NamedMasks,
    read_label_regions,
    read_mask_folder,
    read_regions,
    read_slicer_segmentation,
    region_name,
)
from cohort.inputs.volume import Volume, volume_from_sitk, volume_to_sitk
from tests.nifti_helpers import lps_from_ras, save_nifti, zyx_from_xyz

pytestmark = pytest.mark.timeout(60)

FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS, written out here on purpose
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def ras_anatomy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU (every voxel different, int16-exact), labels 1 and 2, and an affine; RAS, (x, y, z)."""
    x, y, z = np.meshgrid(np.arange(5), np.arange(6), np.arange(7), indexing="ij")
    hu = (-1000 + 3 * x + 17 * y + 101 * z).astype(np.float32)
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:4, 1:3, 0:3] = 1  # 3 x 2 x 3 = 18 voxels
    labels[2:5, 3:6, 4:7] = 2  # 27 voxels
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    affine[:3, 3] = (-12.0, 30.0, 100.0)
    return hu, labels, affine


def oblique(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same array under an affine rotated 30 degrees about z (a tilted acquisition)."""
    c, s = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
    rotation = np.eye(4)
    rotation[:2, :2] = [[c, -s], [s, c]]
    return data, rotation @ affine


STORAGES = {
    "ras": lambda d, a: (d, a),
    "lps": lps_from_ras,
    "permuted": zyx_from_xyz,
    "oblique": oblique,
}


def write_itk(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` (stored (i, j, k)) with SimpleITK, its LPS geometry worked out here."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), isVector=False)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (FLIP @ affine[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in FLIP @ affine[:3, 3]])
    sitk.WriteImage(image, str(path))
    return path


def voxel_centres(volume_affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (RAS mm) position of every voxel centre, (N, 3)."""
    index = np.indices(shape).reshape(3, -1)
    return (volume_affine[:3, :3] @ index + volume_affine[:3, 3:4]).T


def assert_same_as_nifti(volume: Volume, nifti: Path) -> None:
    img = nib.load(nifti)
    assert isinstance(img, nib.Nifti1Image)
    expected = np.asarray(img.dataobj)
    assert volume.shape == expected.shape
    np.testing.assert_array_equal(volume.data, expected)
    np.testing.assert_allclose(
        voxel_centres(volume.affine, volume.shape),
        voxel_centres(img.affine, expected.shape),
        rtol=0,
        atol=1e-4,  # the NIfTI sform is float32
    )


# ------------------------------------------------------------ the conventions


def test_lps_header_maps_to_ras_affine_exactly(tmp_path: Path) -> None:
    """A NRRD SimpleITK writes has an LPS header; the Volume affine is its RAS mirror."""
    image = sitk.GetImageFromArray(np.zeros((4, 3, 2), dtype=np.int16))  # (k, j, i)
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetSpacing((0.5, 0.75, 2.0))
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    header = (tmp_path / "v.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "space: left-posterior-superior" in header
    assert "space origin: (10,20,30)" in header
    volume = read_itk_image(tmp_path / "v.nrrd")
    assert volume.shape == (2, 3, 4)
    expected = np.array(
        [[-0.5, 0, 0, -10.0], [0, -0.75, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1.0]]
    )
    np.testing.assert_array_equal(volume.affine, expected)
    assert "".join(nib.aff2axcodes(volume.affine)) == "LPS"


def test_ras_space_nrrd_header_is_read_in_ras(tmp_path: Path) -> None:
    """A hand-written NRRD in RAS space: ITK turns it into LPS, the Volume back into RAS."""
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)  # (i, j, k)
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\n"
        "sizes: 2 3 4\nspace directions: (0.5,0,0) (0,0.75,0) (0,0,2)\n"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n"
        "space origin: (-12,30,100)\n\n"
    )
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + data.transpose(2, 1, 0).astype("<i2").tobytes())
    volume = read_itk_image(path)
    np.testing.assert_array_equal(volume.data, data)
    expected = np.diag([0.5, 0.75, 2.0, 1.0])
    expected[:3, 3] = (-12.0, 30.0, 100.0)
    np.testing.assert_allclose(volume.affine, expected, rtol=0, atol=1e-12)


def test_volume_to_sitk_writes_lps_and_reads_back(tmp_path: Path) -> None:
    hu, _, affine = ras_anatomy()
    volume = Volume(data=hu, affine=affine, path=tmp_path, description="test volume")
    sitk.WriteImage(volume_to_sitk(volume), str(tmp_path / "back.nrrd"))
    header = (tmp_path / "back.nrrd").read_bytes().split(b"\n\n")[0].decode()
    assert "space origin: (12,-30,100)" in header  # RAS (-12, 30, 100) in LPS
    again = read_itk_image(tmp_path / "back.nrrd")
    np.testing.assert_array_equal(again.data, hu)
    np.testing.assert_allclose(again.affine, affine, rtol=0, atol=1e-12)
    image = volume_to_sitk(volume)
    assert volume_from_sitk(image, tmp_path, "x").data.shape == hu.shape


# ------------------------------------------------ NRRD / MHA vs NIfTI, orientations


@pytest.mark.parametrize("suffix", ITK_SUFFIXES)
@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_itk_copy_reads_as_the_nifti(tmp_path: Path, storage: str, suffix: str) -> None:
    hu, labels, affine = ras_anatomy()
    hu_s, affine_s = STORAGES[storage](hu, affine)
    labels_s, _ = STORAGES[storage](labels, affine)
    image_nii = save_nifti(tmp_path / "image.nii.gz", hu_s.astype(np.int16), affine_s)
    labels_nii = save_nifti(tmp_path / "labels.nii.gz", labels_s, affine_s)
    image = read_itk_image(write_itk(tmp_path / f"image{suffix}", hu_s.astype(np.int16), affine_s))
    label_map = read_itk_label_map(write_itk(tmp_path / f"labels{suffix}", labels_s, affine_s))
    assert image.data.dtype == np.float32
    assert label_map.data.dtype == np.uint8
    assert_same_as_nifti(image, image_nii)
    assert_same_as_nifti(label_map, labels_nii)
    if storage != "oblique":  # the canonical (D, H, W) arrays are the RAS original's
        dhw, spacing = to_dhw(image.data, image.affine)
        np.testing.assert_array_equal(dhw, hu.transpose(2, 1, 0))
        assert spacing == pytest.approx((2.0, 0.75, 0.5))


def test_float_label_map_with_whole_values_becomes_integers(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    volume = read_itk_label_map(write_itk(tmp_path / "f.mha", labels.astype(np.float32), affine))
    assert np.issubdtype(volume.data.dtype, np.integer)
    np.testing.assert_array_equal(volume.data, labels)


def test_non_integer_label_map_is_refused(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    soft = labels.astype(np.float32)
    soft[0, 0, 0] = 0.5
    with pytest.raises(InputError, match=r"mask file .*soft\.nrrd has 1 non-integer voxel"):
        read_itk_label_map(write_itk(tmp_path / "soft.nrrd", soft, affine))


# ------------------------------------------------------------- 4D, 2D, vectors


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_4d_with_singleton_extra_axis_reads_as_3d(tmp_path: Path, suffix: str) -> None:
    hu, _, affine = ras_anatomy()
    three = sitk.ReadImage(str(write_itk(tmp_path / f"three{suffix}", hu, affine)))
    four = sitk.JoinSeries([three])  # size (5, 6, 7, 1)
    assert four.GetDimension() == 4
    sitk.WriteImage(four, str(tmp_path / f"four{suffix}"))
    volume = read_itk_image(tmp_path / f"four{suffix}")
    np.testing.assert_array_equal(volume.data, hu)
    np.testing.assert_allclose(volume.affine, affine, rtol=0, atol=1e-9)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_real_4d_is_refused(tmp_path: Path, suffix: str) -> None:
    hu, _, affine = ras_anatomy()
    three = sitk.ReadImage(str(write_itk(tmp_path / f"three{suffix}", hu, affine)))
    sitk.WriteImage(sitk.JoinSeries([three, three]), str(tmp_path / f"series{suffix}"))
    with pytest.raises(GeometryError, match=r"has shape 5x6x7x2, a 4D series.*split the series"):
        read_itk_image(tmp_path / f"series{suffix}")


def test_2d_file_is_refused(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5), np.int16)), str(tmp_path / "s.nrrd"))
    with pytest.raises(GeometryError, match=r"s\.nrrd has shape 5x6, a 2D slice"):
        read_itk_image(tmp_path / "s.nrrd")


def test_vector_file_is_refused(tmp_path: Path) -> None:
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(GeometryError, match=r"rgb\.nrrd has 3 values per voxel"):
        read_itk_label_map(tmp_path / "rgb.nrrd")


# ------------------------------------------------------------ header first, bad files


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_size_limit_from_the_header_before_reading(tmp_path: Path, suffix: str) -> None:
    hu, _, affine = ras_anatomy()
    whole = write_itk(tmp_path / f"whole{suffix}", hu, affine).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) - 4 * 100])  # header intact, 100 voxels of data gone
    with pytest.raises(InputError, match=rf"cut\{suffix} has 5x6x7 = 210 voxels.*limit of 209"):
        read_itk_image(cut, max_voxels=209)
    with pytest.raises(InputError, match=r"header is readable but the voxel data are not"):
        read_itk_image(cut, max_voxels=210)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"image file .*absent\.nrrd does not exist"):
        read_itk_image(tmp_path / "absent.nrrd")
    junk = tmp_path / "junk.mha"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"image file .*junk\.mha is not a readable MetaImage"):
        read_itk_image(junk)
    (tmp_path / "image.vtk").write_bytes(b"x")
    with pytest.raises(InputError, match=r"does not end in \.nrrd, \.nhdr, \.mha, \.mhd"):
        read_itk_image(tmp_path / "image.vtk")


# --------------------------------------------------------------- mask folders


@pytest.fixture
def mask_folder(tmp_path: Path) -> Path:
    """tibia.nii.gz, femur.nrrd, bone.mha (= tibia or femur: overlaps both), a README."""
    _, labels, affine = ras_anatomy()
    folder = tmp_path / "masks"
    folder.mkdir()
    save_nifti(folder / "tibia.nii.gz", (labels == 1).astype(np.uint8), affine)
    write_itk(folder / "femur.nrrd", (labels == 2).astype(np.uint8) * 255, affine)  # 0/255
    write_itk(folder / "bone.mha", (labels > 0).astype(np.int16), affine)
    (folder / "README.md").write_text("masks of one knee\n")
    return folder


def test_region_names_are_file_names_without_extensions() -> None:
    assert region_name(Path("liver.nii.gz")) == "liver"
    assert region_name(Path("Spleen.NRRD")) == "Spleen"
    assert region_name(Path("left_kidney.mha")) == "left_kidney"
    assert region_name(Path("notes.txt")) is None
    assert region_name(Path(".nii.gz")) is None


def test_mask_folder_reads_one_mask_per_file_overlaps_kept(mask_folder: Path) -> None:
    _, labels, affine = ras_anatomy()
    masks = read_mask_folder(mask_folder)
    assert masks.names == ("bone", "femur", "tibia")  # file-name order; README ignored
    assert masks.shape == (5, 6, 7)
    np.testing.assert_allclose(masks.affine, affine, rtol=0, atol=1e-6)
    selected = masks.select(["tibia", "femur", "bone"])
    assert [name for name, _ in selected] == ["tibia", "femur", "bone"]
    for (_, mask), expected in zip(selected, [labels == 1, labels == 2, labels > 0], strict=True):
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, expected)
    assert [int(m.sum()) for _, m in selected] == [18, 27, 45]  # bone overlaps both


def test_label_map_split_into_files_reads_back_to_the_same_masks(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    label_file = save_nifti(tmp_path / "labels.nii.gz", labels, affine)
    folder = tmp_path / "split"
    folder.mkdir()
    for name, value in (("tibia", 1), ("femur", 2)):
        write_itk(folder / f"{name}.nrrd", (labels == value).astype(np.uint8), affine)
    from_files = read_regions(folder)
    from_labels = read_regions(label_file, (("tibia", 1), ("femur", 2)))
    assert isinstance(from_files, NamedMasks)
    assert isinstance(from_labels, LabelRegions)
    for (name_a, a), (name_b, b) in zip(
        from_files.select(["femur", "tibia"]), from_labels.select(["femur", "tibia"]), strict=True
    ):
        assert name_a == name_b
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(from_files.affine, from_labels.affine, rtol=0, atol=1e-6)


def test_missing_region_lists_the_names_present(mask_folder: Path) -> None:
    masks = read_mask_folder(mask_folder)
    with pytest.raises(RegionError) as info:
        masks.select(["tibia", "patella"])
    message = str(info.value)
    assert f"mask folder {mask_folder} has no region 'patella'" in message
    assert "regions present: 'bone', 'femur', 'tibia'" in message
    assert "add a mask file patella.nii.gz" in message


def test_empty_mask_is_a_region_error(mask_folder: Path) -> None:
    _, _, affine = ras_anatomy()
    save_nifti(mask_folder / "patella.nii", np.zeros((5, 6, 7), np.uint8), affine)
    masks = read_mask_folder(mask_folder)
    with pytest.raises(
        RegionError, match=r"region 'patella' .*\(file patella\.nii\) has no voxels"
    ):
        masks.select(["patella"])


def test_non_binary_mask_file_is_refused(mask_folder: Path) -> None:
    _, labels, affine = ras_anatomy()
    save_nifti(mask_folder / "both.nii.gz", labels, affine)
    with pytest.raises(InputError) as info:
        read_mask_folder(mask_folder)
    message = str(info.value)
    assert "both.nii.gz is not binary: it holds the values 0, 1 and 2" in message
    assert "give the label-map file itself as the mask" in message


def test_mask_on_another_grid_is_refused(mask_folder: Path) -> None:
    _, labels, affine = ras_anatomy()
    save_nifti(mask_folder / "small.nii.gz", (labels[:, :, :6] == 1).astype(np.uint8), affine)
    with pytest.raises(GeometryError, match=r"small\.nii\.gz has grid 5x6x6 but bone\.mha .*5x6x7"):
        read_mask_folder(mask_folder)
    (mask_folder / "small.nii.gz").unlink()
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    save_nifti(mask_folder / "shifted.nii.gz", (labels == 1).astype(np.uint8), shifted)
    with pytest.raises(GeometryError, match=r"shifted\.nii\.gz lies on another grid.* 0\.5 mm"):
        read_mask_folder(mask_folder)


def test_mask_folder_without_masks_and_name_clashes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"holds no mask files .* found: notes\.txt"):
        read_mask_folder(tmp_path)
    _, labels, affine = ras_anatomy()
    save_nifti(tmp_path / "tibia.nii.gz", (labels == 1).astype(np.uint8), affine)
    write_itk(tmp_path / "tibia.nrrd", (labels == 1).astype(np.uint8), affine)
    with pytest.raises(InputError, match=r"two files for region 'tibia': tibia\.nii\.gz and tibia"):
        read_mask_folder(tmp_path)
    (tmp_path / "tibia.nrrd").unlink()
    save_nifti(tmp_path / "background.nii", (labels == 0).astype(np.uint8), affine)
    with pytest.raises(InputError, match=r"background\.nii is named 'background', which is res"):
        read_mask_folder(tmp_path)


# --------------------------------------------------------------- label maps


def test_label_regions_select_in_order_and_name_what_is_missing(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    path = write_itk(tmp_path / "labels.nrrd", labels, affine)
    regions = read_label_regions(path, (("tibia", 1), ("femur", 2), ("patella", 5)))
    assert regions.names == ("tibia", "femur", "patella")
    (femur, mask), (tibia, _) = regions.select(["femur", "tibia"])
    assert (femur, tibia, int(mask.sum())) == ("femur", "tibia", 27)
    with pytest.raises(RegionError, match=r"names no region 'fibula'; names in it: 'tibia'"):
        regions.select(["fibula"])
    with pytest.raises(RegionError, match=r"no voxel with value 5 \(label 'patella'\); values pr"):
        regions.select(["patella"])
    with pytest.raises(InputError, match=r"labels\.nrrd is a label map, and no label map"):
        read_regions(path)


# ------------------------------------------------------- 3D Slicer segmentations


def write_seg_nrrd(path: Path, layers: np.ndarray, affine: np.ndarray, fields: str) -> Path:
    """A .seg.nrrd as 3D Slicer writes it: layers first ("list"), LPS space, gzip.

    ``layers`` is (L, i, j, k) uint8; ``fields`` the Segment lines (``key:=value``).
    """
    lps = FLIP @ affine[:3, :]
    directions = " ".join("(" + ",".join(f"{v:g}" for v in lps[:, c]) + ")" for c in range(3))
    header = (
        "NRRD0004\n"
        "# Complete NRRD file format specification at:\n"
        "# http://teem.sourceforge.net/nrrd/format.html\n"
        "type: unsigned char\n"
        "dimension: 4\n"
        "space: left-posterior-superior\n"
        f"sizes: {' '.join(str(n) for n in layers.shape)}\n"
        f"space directions: none {directions}\n"
        "kinds: list domain domain domain\n"
        "encoding: gzip\n"
        f"space origin: ({','.join(f'{v:g}' for v in lps[:, 3])})\n"
        "measurement frame: (1,0,0) (0,1,0) (0,0,1)\n"
        "Segmentation_MasterRepresentation:=Binary labelmap\n"
        f"{fields}\n"
    )
    raw = np.ascontiguousarray(layers.astype(np.uint8).transpose(3, 2, 1, 0)).tobytes()
    path.write_bytes(header.encode() + gzip.compress(raw))
    return path


def segment(index: int, name: str, layer: int, value: int) -> str:
    return (
        f"Segment{index}_Color:=0.5 0.5 0.5\nSegment{index}_ID:=Segment_{index + 1}\n"
        f"Segment{index}_LabelValue:={value}\nSegment{index}_Layer:={layer}\n"
        f"Segment{index}_Name:={name}\nSegment{index}_Tags:=Segmentation.Status:inprogress|\n"
    )


@pytest.fixture
def two_layers() -> tuple[np.ndarray, np.ndarray]:
    """Layer 0: tibia = 1, femur = 2; layer 1: lesion = 1 (inside the tibia), marrow = 3."""
    _, labels, affine = ras_anatomy()
    lesion = np.zeros_like(labels)
    lesion[2, 1, 1] = 1  # overlaps the tibia, shares its label value on another layer
    lesion[3, 4, 5] = 3  # inside the femur
    return np.stack([labels, lesion]), affine


def test_slicer_two_layers_shared_label_value(
    tmp_path: Path, two_layers: tuple[np.ndarray, np.ndarray]
) -> None:
    layers, affine = two_layers
    fields = (
        segment(0, "tibia", 0, 1)
        + segment(1, "femur", 0, 2)
        + segment(2, "lesion", 1, 1)
        + segment(3, "marrow spot", 1, 3)
    )
    path = write_seg_nrrd(tmp_path / "knee.seg.nrrd", layers, affine, fields)
    masks = read_slicer_segmentation(path)
    assert masks.names == ("tibia", "femur", "lesion", "marrow spot")
    assert masks.description == "3D Slicer segmentation"
    np.testing.assert_allclose(masks.affine, affine, rtol=0, atol=1e-9)
    selected = dict(masks.select(["lesion", "tibia", "femur", "marrow spot"]))
    np.testing.assert_array_equal(selected["tibia"], layers[0] == 1)
    np.testing.assert_array_equal(selected["femur"], layers[0] == 2)
    np.testing.assert_array_equal(selected["lesion"], layers[1] == 1)
    assert np.argwhere(selected["lesion"]).tolist() == [[2, 1, 1]]
    assert np.argwhere(selected["marrow spot"]).tolist() == [[3, 4, 5]]
    assert bool(selected["tibia"][2, 1, 1])  # the overlap is kept in both
    assert read_regions(path).names == masks.names  # dispatch by the .seg.nrrd name


def test_slicer_one_layer_written_by_simpleitk(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    image = sitk.ReadImage(str(write_itk(tmp_path / "plain.nrrd", labels, affine)))
    for key, value in (
        ("Segment0_Name", "femur"),
        ("Segment0_LabelValue", "2"),
        ("Segment0_Layer", "0"),
        ("Segment1_Name", "tibia"),
        ("Segment1_LabelValue", "1"),
        ("Segment1_Layer", "0"),
    ):
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(tmp_path / "one.seg.nrrd"), useCompression=True)
    masks = read_slicer_segmentation(tmp_path / "one.seg.nrrd")
    assert masks.names == ("femur", "tibia")
    (_, femur), (_, tibia) = masks.select(["femur", "tibia"])
    np.testing.assert_array_equal(femur, labels == 2)
    np.testing.assert_array_equal(tibia, labels == 1)
    np.testing.assert_allclose(masks.affine, affine, rtol=0, atol=1e-9)


def test_slicer_file_without_layer_keys_has_one_segment_per_layer(tmp_path: Path) -> None:
    _, labels, affine = ras_anatomy()
    layers = np.stack([(labels == 1), (labels > 0)]).astype(np.uint8)  # before Slicer 4.11
    fields = "Segment0_Name:=tibia\nSegment1_Name:=bone\n"
    masks = read_slicer_segmentation(
        write_seg_nrrd(tmp_path / "old.seg.nrrd", layers, affine, fields)
    )
    (_, tibia), (_, bone) = masks.select(["tibia", "bone"])
    np.testing.assert_array_equal(tibia, labels == 1)
    np.testing.assert_array_equal(bone, labels > 0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("", r"has no segments in its header .*give it as a label-map file"),
        (segment(0, "tibia", 0, 1) + segment(1, "tibia", 1, 1), r"two segments are named 'tibia'"),
        (segment(0, "tibia", 2, 1), r"'tibia'\) is on layer 2, but the file has 2 layer\(s\)"),
        (segment(0, "background", 0, 1), r"named 'background', which is reserved"),
        (segment(0, "tibia", 0, 1).replace("LabelValue:=1", "LabelValue:=one"), r"= 'one'"),
    ],
)
def test_bad_slicer_headers_are_refused(
    tmp_path: Path, two_layers: tuple[np.ndarray, np.ndarray], fields: str, message: str
) -> None:
    layers, affine = two_layers
    path = write_seg_nrrd(tmp_path / "bad.seg.nrrd", layers, affine, fields)
    with pytest.raises(InputError, match=message):
        read_slicer_segmentation(path)


def test_slicer_segment_missing_from_selection_lists_segments(
    tmp_path: Path, two_layers: tuple[np.ndarray, np.ndarray]
) -> None:
    layers, affine = two_layers
    path = write_seg_nrrd(tmp_path / "k.seg.nrrd", layers, affine, segment(0, "tibia", 0, 1))
    with pytest.raises(RegionError, match=re.escape("regions present: 'tibia'; fix the region")):
        read_slicer_segmentation(path).select(["femur"])


def test_layered_segmentation_given_as_a_label_map_says_what_it_is(
    tmp_path: Path, two_layers: tuple[np.ndarray, np.ndarray]
) -> None:
    layers, affine = two_layers
    path = write_seg_nrrd(tmp_path / "k.seg.nrrd", layers, affine, segment(0, "tibia", 0, 1))
    with pytest.raises(GeometryError, match=r"2 values per voxel .*3D Slicer segmentation"):
        read_itk_label_map(path)
