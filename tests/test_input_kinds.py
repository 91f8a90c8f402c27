"""Every accepted input kind through the stages and the pooling, against the NIfTI pair.

One small anatomy (RAS, HU different in every voxel, a tibia and a femur) is
written as a NIfTI pair; each other form of it (NRRD/MHA copies, one mask file
per structure, a 3D Slicer segmentation, other storage orientations, a mask on
another grid) must give the same vectors, or the vectors the test works out on
its own. Vectors come from a random-weight DenseNet121 hooked at two shallow
convolutions, so the numbers are real network features at a small cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import LabelMap, PoolingConfig, PreprocessConfig
from cohort.errors import GeometryError, InputError, ModelError, RegionError
from cohort.inputs.geometry import LayerReach, Reach
from cohort.inputs.preprocess import Prepared, air_value
from cohort.inputs.stages import Stages, prepare
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import extract
from cohort.model.reach import layer_reach
from cohort.report.figures import fig_overlays, load_slice
from tests.nifti_helpers import save_nifti
from tests.processes import python_stdout
from tests.test_formats import segment, write_itk, write_seg_nrrd
from tests.test_inputs import stored_as

pytestmark = pytest.mark.timeout(300)

LABELS: LabelMap = (("tibia", 1), ("femur", 2))
NAMES: LabelMap = (("tibia", None), ("femur", None))
CFG = PreprocessConfig()
SHALLOW = ("features.denseblock2.denselayer12.conv2", "features.denseblock3.denselayer1.conv2")
Vectors = dict[tuple[str, str], np.ndarray]


def anatomy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU (x, y, z) = (26, 30, 22), labels tibia 1 (inferior) and femur 2, an RAS affine."""
    x, y, z = np.meshgrid(np.arange(26), np.arange(30), np.arange(22), indexing="ij")
    hu = (-900 + 13 * x + 29 * y + 61 * z + (x * y) % 17).astype(np.float32)
    labels = np.zeros((26, 30, 22), dtype=np.uint8)
    labels[4:20, 5:22, 2:10] = 1  # no axis symmetric: a flip along any one shows
    labels[9:18, 11:21, 12:20] = 2
    affine = np.diag([0.8, 0.7, 1.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, -300.0)
    return hu, labels, affine


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    network, _ = build_network("densenet121", random_weights("densenet121", 3).state_dict)
    return FeatureExtractor(network, resolve_layers(network, SHALLOW))


def vectors(extractor: FeatureExtractor, prepared: Prepared) -> Vectors:
    pooled = extract(
        extractor,
        torch.from_numpy(prepared.image),
        torch.from_numpy(np.ascontiguousarray(prepared.region_index)),
        prepared.region_names,
        PoolingConfig(),
        air_value(CFG),
    )
    return {(v.region, v.layer): v.vector for v in pooled}


def assert_same_vectors(a: Vectors, b: Vectors, names: tuple[str, ...] | None = None) -> None:
    keys = [k for k in a if names is None or k[0] in names]
    assert keys and (names is not None or set(a) == set(b))
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def mask_folder(tmp_path: Path, affine: np.ndarray, **masks: np.ndarray) -> Path:
    """A folder of one NIfTI mask per structure: ``tmp_path/masks/<name>.nii.gz``."""
    folder = tmp_path / "masks"
    folder.mkdir()
    for name, mask in masks.items():
        save_nifti(folder / f"{name}.nii.gz", mask.astype(np.uint8), affine)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    hu, labels, affine = anatomy()
    folder = tmp_path_factory.mktemp("nifti")
    return (
        save_nifti(folder / "image.nii.gz", hu, affine),
        save_nifti(folder / "labels.nii.gz", labels, affine),
    )


@pytest.fixture(scope="module")
def reference(extractor: FeatureExtractor, pair: tuple[Path, Path]) -> Vectors:
    return vectors(extractor, prepare(*pair, LABELS, True, CFG))


# ---------------------------------------------------------------- file formats


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nhdr"])
def test_nrrd_and_mha_copies_give_the_nifti_vectors(
    extractor: FeatureExtractor, reference: Vectors, tmp_path: Path, suffix: str
) -> None:
    hu, labels, affine = anatomy()
    image = write_itk(tmp_path / f"image{suffix}", hu.astype(np.int16), affine)
    mask = write_itk(tmp_path / f"labels{suffix}", labels, affine)
    assert_same_vectors(vectors(extractor, prepare(image, mask, LABELS, True, CFG)), reference)


def test_label_map_split_into_one_file_per_structure_gives_the_same_vectors(
    extractor: FeatureExtractor, reference: Vectors, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _hu, labels, affine = anatomy()
    folder = tmp_path / "masks"
    folder.mkdir()
    save_nifti(folder / "tibia.nii.gz", (labels == 1).astype(np.uint8), affine)
    write_itk(folder / "femur.nrrd", (labels == 2).astype(np.uint8) * 255, affine)
    (folder / "README.txt").write_text("one mask per structure\n")
    prepared = prepare(pair[0], folder, NAMES, True, CFG)
    assert prepared.region_index.shape == prepared.image.shape  # disjoint: one plane
    assert_same_vectors(vectors(extractor, prepared), reference)


def test_overlapping_regions_from_files_each_get_their_own_voxels(
    extractor: FeatureExtractor, reference: Vectors, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """'bone' (tibia or femur) overlaps 'tibia': each is pooled on its own voxels."""
    _hu, labels, affine = anatomy()
    both, alone = tmp_path / "both", tmp_path / "alone"
    both.mkdir()
    alone.mkdir()
    save_nifti(both / "tibia.nii.gz", (labels == 1).astype(np.uint8), affine)
    save_nifti(both / "bone.nii.gz", (labels > 0).astype(np.uint8), affine)
    save_nifti(alone / "bone.nii.gz", (labels > 0).astype(np.uint8), affine)
    prepared = prepare(pair[0], both, (("tibia", None), ("bone", None)), True, CFG)
    assert prepared.region_index.shape == (2, *prepared.image.shape)  # a second plane
    bone = int(np.count_nonzero(labels))
    assert prepared.voxels == (int(np.count_nonzero(labels == 1)), bone, labels.size - bone)
    got = vectors(extractor, prepared)
    assert_same_vectors(got, reference, ("tibia",))  # as in the label map
    bone_alone = prepare(pair[0], alone, (("bone", None),), True, CFG)
    assert_same_vectors(got, vectors(extractor, bone_alone), ("bone", "background"))


def test_slicer_segmentation_gives_the_label_map_vectors_by_segment_name(
    extractor: FeatureExtractor, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _hu, labels, affine = anatomy()
    layers = np.stack([(labels == 2).astype(np.uint8) * 7, (labels == 1).astype(np.uint8)])
    fields = segment(0, "femur", 0, 7) + segment(1, "tibia", 1, 1) + segment(2, "Segment_3", 1, 9)
    seg = write_seg_nrrd(tmp_path / "knee.seg.nrrd", layers, affine, fields)
    femur_first: LabelMap = (("femur", 2), ("tibia", 1))
    expected = vectors(extractor, prepare(pair[0], pair[1], femur_first, True, CFG))
    by_name = (("femur", None), ("tibia", None))
    got = vectors(extractor, prepare(pair[0], seg, by_name, True, CFG))
    assert_same_vectors(got, expected)


# --------------------------------------------------------- storage orientation


@pytest.mark.parametrize(
    ("image_storage", "mask_storage"),
    [
        (((0, 1, 2), (True, True, False)), ((0, 1, 2), (True, False, False))),  # LPS, LAS
        (((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, True, False))),  # RAS, LPS
        (((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, False, True))),  # permuted
    ],
    ids=["image-LPS-mask-LAS", "image-RAS-mask-LPS", "axes-permuted"],
)
def test_other_storage_of_the_same_grid_gives_the_same_vectors(
    extractor: FeatureExtractor,
    reference: Vectors,
    tmp_path: Path,
    image_storage: tuple[tuple[int, ...], tuple[bool, ...]],
    mask_storage: tuple[tuple[int, ...], tuple[bool, ...]],
) -> None:
    hu, labels, affine = anatomy()
    s_hu, s_image_affine = stored_as(hu, affine, *image_storage)
    s_labels, s_mask_affine = stored_as(labels, affine, *mask_storage)
    assert not np.allclose(s_image_affine, s_mask_affine)  # the stored affines differ
    prepared = prepare(
        save_nifti(tmp_path / "i.nii.gz", s_hu, s_image_affine),
        save_nifti(tmp_path / "m.nii.gz", s_labels, s_mask_affine),
        LABELS,
        True,
        CFG,
    )
    assert not prepared.mask_resampled
    assert_same_vectors(vectors(extractor, prepared), reference)


# ------------------------------------------------------------ mask on another grid


NEAREST = PreprocessConfig(mask_resample="nearest")


def test_mask_on_a_larger_grid_needs_the_option_then_matches_the_cropped_mask(
    extractor: FeatureExtractor, reference: Vectors, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """The full field of view saved with the mask: 3/4 voxels more per side, same spacing."""
    _hu, labels, affine = anatomy()
    padded = np.zeros((26 + 7, 30 + 5, 22 + 9), dtype=np.uint8)
    padded[3:29, 4:34, 6:28] = labels
    big_affine = affine.copy()
    big_affine[:3, 3] -= affine[:3, :3] @ np.array([3.0, 4.0, 6.0])
    big = save_nifti(tmp_path / "big.nii.gz", padded, big_affine)
    with pytest.raises(GeometryError) as info:
        Stages(LABELS, CFG).checked(pair[0], big)
    assert "does not match image grid" in str(info.value)
    assert "--mask-resample nearest" in str(info.value)
    prepared = prepare(pair[0], big, LABELS, True, NEAREST)
    assert prepared.mask_resampled
    assert_same_vectors(vectors(extractor, prepared), reference)
    on_grid = prepare(*pair, LABELS, True, NEAREST)  # the option changes nothing here
    assert not on_grid.mask_resampled
    assert_same_vectors(vectors(extractor, on_grid), reference)


def nearest_by_hand(
    mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Each image voxel centre (stored i, j, k) -> world -> mask index, rounded; 0 outside."""
    index = np.indices(shape).reshape(3, -1).astype(np.float64)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    inverse = np.linalg.inv(mask_affine)
    continuous = inverse[:3, :3] @ world + inverse[:3, 3:4]
    nearest = np.floor(continuous + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros(index.shape[1], dtype=mask.dtype)
    out[inside] = mask[tuple(nearest[:, inside])]
    return out.reshape(shape)


def test_mask_on_a_finer_grid_is_resampled_by_nearest_neighbour(
    extractor: FeatureExtractor, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A mask at 0.3 x 0.35 x 0.6 mm, shifted off the image's voxel centres, stored LPS."""
    hu, _labels, affine = anatomy()
    fine_affine = np.diag([0.3, 0.35, 0.6, 1.0])
    fine_affine[:3, 3] = affine[:3, 3] + np.array([-0.13, 0.07, -0.21])
    fine = np.zeros((66, 58, 52), dtype=np.uint8)
    index = np.indices(fine.shape).reshape(3, -1).astype(np.float64)
    world = fine_affine[:3, :3] @ index + fine_affine[:3, 3:4]
    ellipsoid = ((world[0] + 1.0) / 5.0) ** 2 + ((world[1] - 30.0) / 6.0) ** 2
    fine.reshape(-1)[(ellipsoid + ((world[2] + 290.0) / 9.0) ** 2) < 1] = 1
    fine.reshape(-1)[(world[2] > -285.0) & (np.abs(world[0] - 3.0) < 3.0)] = 2
    stored, stored_affine = stored_as(fine, fine_affine, (0, 1, 2), (True, True, False))
    mask = save_nifti(tmp_path / "fine.nii.gz", stored, stored_affine)
    expected = nearest_by_hand(fine, fine_affine, hu.shape, affine)
    assert {int(v) for v in np.unique(expected)} == {0, 1, 2}
    by_hand = save_nifti(tmp_path / "by_hand.nii.gz", expected, affine)
    got = prepare(pair[0], mask, LABELS, True, NEAREST)
    assert got.mask_resampled
    want = prepare(pair[0], by_hand, LABELS, True, CFG)
    np.testing.assert_array_equal(got.region_index, want.region_index)
    assert_same_vectors(vectors(extractor, got), vectors(extractor, want))


def failure(stages: Stages, image: Path, mask: Path, error: type[Exception]) -> tuple[str, str]:
    """The stage at which loading and checking the pair fails with ``error``, and its message."""
    with pytest.raises(error) as info:
        stages.checked(image, mask)
    return stages.stage, str(info.value)


def test_region_reaching_outside_the_image_is_an_error(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _hu, labels, affine = anatomy()
    padded = np.zeros((26 + 4, 30, 22), dtype=np.uint8)
    padded[2:28] = labels
    padded[0:2, 10:12, 3:5] = 1  # 8 tibia voxels beyond the image's left face
    big_affine = affine.copy()
    big_affine[0, 3] -= 2 * affine[0, 0]
    big = save_nifti(tmp_path / "big.nii.gz", padded, big_affine)
    stage, message = failure(Stages(LABELS, NEAREST), pair[0], big, RegionError)
    assert stage == "check"
    assert "region 'tibia'" in message and "has 8 of" in message
    assert "outside the image" in message


# ------------------------------------------------------ labels of the wrong kind


def test_labels_of_the_wrong_kind_for_the_mask_say_which_kind_it_needs(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _hu, labels, affine = anatomy()
    folder = mask_folder(tmp_path, affine, tibia=labels == 1)
    stage, message = failure(Stages(LABELS, CFG), pair[0], folder, InputError)
    assert stage == "load"
    assert "mask folder" in message and "bare" in message
    assert "'tibia,femur'" in message
    with pytest.raises(InputError, match=r"label-map file .*bare names.*tibia=1,femur=2"):
        Stages(NAMES, CFG).checked(*pair)


# ------------------------------------------------------------------ thin slabs


@pytest.fixture(scope="module")
def default_reach() -> Reach:
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    return layer_reach(network, resolve_layers(network, ["conv-1", "conv-3", "conv-5"]))


def test_thin_slab_fails_at_check_with_the_minimum_and_the_fixes(
    default_reach: Reach, tmp_path: Path
) -> None:
    hu, labels, affine = anatomy()  # 22 slices of 1.5 mm
    image = save_nifti(tmp_path / "i.nii.gz", hu, affine)
    mask = save_nifti(tmp_path / "m.nii.gz", labels, affine)
    stage, message = failure(Stages(LABELS, CFG, default_reach), image, mask, GeometryError)
    assert stage == "check"
    assert "model input of 22x30x26 voxels" in message
    assert "at least 29 voxels along D" in message and "22 here, 33 mm" in message
    assert "hooked layers conv-1, conv-3, conv-5" in message
    assert "and 29 voxels along W, left-right (26 here, 20.8 mm)" in message
    assert "--spacing 1.157,0.7,0.729" in message  # 33 mm / 1.157 mm = 28.52 -> 29 slices
    assert "this input reaches features.denseblock3 (from 13x13x13 voxels)" in message
    finer = PreprocessConfig(target_spacing=(1.157, 0.7, 0.729))
    Stages(LABELS, finer, default_reach).checked(image, mask)  # the fix works


def test_crop_that_leaves_a_thin_slab_fails_after_cropping(
    default_reach: Reach, tmp_path: Path
) -> None:
    hu, labels, affine = anatomy()
    tall = np.concatenate([hu] * 2, axis=2)  # 44 slices: passes the check stage
    image = save_nifti(tmp_path / "i.nii.gz", tall, affine)
    low = np.concatenate([labels, np.zeros_like(labels)], axis=2)  # tibia: 8 slices
    mask = save_nifti(tmp_path / "m.nii.gz", low, affine)
    cropped = PreprocessConfig(crop_margin_mm=0.0)
    stages = Stages((("tibia", 1),), cropped, Reach((LayerReach("conv-1", "x", (29, 1, 1)),)))
    with pytest.raises(GeometryError, match=r"after cropping .*a larger --crop-margin"):
        stages.prepared(image, mask, True)
    assert stages.stage == "preprocess"


def test_reach_matches_the_real_network() -> None:
    """layer_reach (meta-device probes) against forward passes of the real network."""
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    for specs, least in ((["conv-1"], 29), (["features.denseblock3"], 13)):
        layers = resolve_layers(network, specs)
        assert layer_reach(network, layers).layers[0].min_shape == (least, least, least)
        extractor = FeatureExtractor(network, layers)
        with torch.inference_mode():
            for axis in range(3):
                shape = [least, least, least]
                extractor(torch.zeros(1, 1, *shape))
                shape[axis] = least - 1
                with pytest.raises((RuntimeError, ModelError), match=r"smaller than|too small"):
                    extractor(torch.zeros(1, 1, *shape))


def test_reach_is_remembered_on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A second process (here: the in-process memo cleared) reads the answer back instead
    of probing again; another cohort version or architecture would not find it."""
    from cohort.model import reach

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    layers = resolve_layers(network, ["conv-1", "features.denseblock2"])
    reach._cache.clear()
    first = layer_reach(network, layers)
    assert len(list((tmp_path / "cohort" / "reach").glob("*.json"))) == 1
    reach._cache.clear()

    def no_probe(*_: object) -> None:
        raise AssertionError("probed although the answer was on disk")

    monkeypatch.setattr(reach, "_finished", no_probe)
    assert layer_reach(network, layers) == first
    assert first.layers[0].min_shape == (29, 29, 29)
    reach._cache.clear()
    monkeypatch.setattr(reach, "__version__", "0.0.0-other")
    with pytest.raises(AssertionError, match="probed"):
        layer_reach(network, layers)


def test_a_nifti_only_loader_never_imports_simpleitk(pair: tuple[Path, Path]) -> None:
    code = (
        "import sys\n"
        "from cohort.execution.load import load_subject\n"
        "from cohort.config import RunConfig\n"
        f"row = dict(subject_id='s', image={str(pair[0])!r}, mask={str(pair[1])!r},\n"
        "           labels='tibia=1,femur=2')\n"
        "out = load_subject(row, RunConfig(), 'id', frozenset())\n"
        "print(out['status'], 'SimpleITK' in sys.modules, 'torch' in sys.modules)\n"
    )
    assert python_stdout(code).split() == ["ready", "False", "False"]


# ------------------------------------------------------ validate and the report


# layers these small volumes reach (DenseNet121's conv-1 needs 29 voxels along D)
SHALLOW_ARGS = ("--layers", ",".join(SHALLOW))


def test_validate_reads_every_kind_and_takes_the_resample_option(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _, labels, affine = anatomy()
    folder = mask_folder(tmp_path, affine, tibia=labels == 1, femur=labels == 2)
    padded = np.zeros((28, 30, 22), dtype=np.uint8)
    padded[1:27] = labels
    big_affine = affine.copy()
    big_affine[0, 3] -= affine[0, 0]
    big = save_nifti(tmp_path / "big.nii.gz", padded, big_affine)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "subject_id,image,mask,labels\n"
        f"folder,{pair[0]},{folder},\n"
        f'map,{pair[0]},{pair[1]},"tibia=1,femur=2"\n'
        f'big,{pair[0]},{big},"tibia=1,femur=2"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(
        main, ["validate", str(manifest), "--labels", "tibia,femur", *SHALLOW_ARGS]
    )
    assert result.exit_code == 1, result.output
    assert "3 subjects, 1 with problems" in result.output
    assert "big\tcheck\tmask grid 22x30x28" in result.output and "--mask-resample" in result.output
    again = CliRunner().invoke(
        main,
        [
            "validate",
            str(manifest),
            "--labels",
            "tibia,femur",
            "--mask-resample",
            "nearest",
            *SHALLOW_ARGS,
        ],
    )
    assert again.exit_code == 0, again.output


def test_report_slice_draws_each_named_region_of_every_mask_kind(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    _, labels, affine = anatomy()
    folder = mask_folder(tmp_path, affine, tibia=labels == 1, bone=labels > 0)
    las, las_affine = stored_as(labels, affine, (0, 1, 2), (False, True, False))
    las_map = save_nifti(tmp_path / "las.nii.gz", las, las_affine)
    from_map = load_slice("s", "c", pair[0], las_map, LABELS)
    # the slice by hand: RAS data (x, y, z) -> (D=z, W=x) at the middle labelled y
    ys = np.flatnonzero((labels > 0).any(axis=(0, 2)))
    y = int((ys[0] + ys[-1]) // 2)
    assert from_map.index == y
    np.testing.assert_array_equal(from_map.labels, labels[:, y, :].T)
    assert from_map.names == LABELS
    from_folder = load_slice("s", "c", pair[0], folder, (("tibia", None), ("bone", None)))
    expected = np.where(labels[:, y, :].T > 0, 2, 0)  # bone (drawn last) covers the tibia
    np.testing.assert_array_equal(from_folder.labels, expected)
    assert from_folder.names == (("tibia", 1), ("bone", 2))
    figure = fig_overlays([from_map, from_folder])
    assert len(figure.axes) == 2
