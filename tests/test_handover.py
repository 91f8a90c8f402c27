"""The loaders' compact hand-over and the actors' device-side intensity step.

The loader task (:func:`cohort.execution.load.load_subject`) hands over HU as
integers and the region index as numpy columns (no pickled float volume); the
feature actor (:class:`cohort.execution.extract.Features`) windows and
normalises them in torch. The reference is the numpy float path as it was
before (:func:`cohort.inputs.stages.prepare`: reorient, place, window and
normalise in numpy, float32) fed to the same pooling: every input kind and
every pooling mode, with and without ``--spacing`` and ``--crop-margin``, must
give the same vectors to 1e-6 relative (on the CPU they are bit for bit).
"""

from __future__ import annotations

import gzip
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from cohort.config import (
    LabelMap,
    ModelConfig,
    PoolingConfig,
    PreprocessConfig,
    RunConfig,
)
from cohort.errors import InputError
from cohort.execution.extract import Features
from cohort.execution.load import READY, load_subject
from cohort.inputs.handover import ARRAYS, COLUMNS, compact_hu, handed_bytes
from cohort.inputs.nifti import nifti_from_bytes, open_nifti, read_nifti
from cohort.inputs.stages import prepare
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import extract
from tests.nifti_helpers import save_nifti
from tests.test_formats import segment, write_itk, write_seg_nrrd
from tests.test_input_kinds import LABELS, SHALLOW, anatomy

pytestmark = pytest.mark.timeout(300)

DICOM = Path("/work/shared/data/ct-dicom-20")
RTOL = 1e-6  # the bound; on the CPU the two paths agree bit for bit


# ------------------------------------------------------------- reading NIfTI once


@pytest.mark.parametrize(
    ("dtype", "slope", "suffix"),
    [
        ("<i2", None, ".nii.gz"),
        (">i2", None, ".nii.gz"),  # big-endian
        ("u1", None, ".nii.gz"),
        ("<f4", None, ".nii.gz"),
        ("<i2", 0.5, ".nii.gz"),  # scaled: HU = stored * 0.5 - 1024
        ("<i2", None, ".nii"),
    ],
)
def test_nifti_from_its_bytes_equals_nibabel(
    tmp_path: Path, dtype: str, slope: float | None, suffix: str
) -> None:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 200, (9, 7, 5)).astype(dtype)
    affine = np.diag([0.8, 0.7, 1.5, 1.0])
    path = save_nifti(
        tmp_path / f"x{suffix}",
        data,
        affine,
        slope=slope,
        inter=None if slope is None else -1024.0,
    )
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == suffix.endswith(".gz")
    img = open_nifti(path, "image", 10**6, raw=raw)
    got = read_nifti(img, path, "image", labels=False, raw=raw).data
    expected = nib.load(path).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(got, expected)  # the values, whatever the type
    if slope is not None or dtype.endswith("f4"):
        assert got.dtype == np.float32
    else:  # HU as stored: the integers themselves, no float copy
        assert got.dtype == np.dtype(dtype).newbyteorder("=") or got.dtype == np.dtype(dtype)
    if slope is None and not dtype.endswith("f4"):
        mask = open_nifti(path, "mask", 10**6, raw=raw)
        labels = read_nifti(mask, path, "mask", labels=True, raw=raw)
        reference = np.asarray(nib.load(path).dataobj)
        np.testing.assert_array_equal(labels.data, reference)
        assert labels.data.dtype == reference.dtype


def _with_extension(path: Path, data: np.ndarray) -> Path:
    """A NIfTI file whose voxels start after a header extension (vox_offset > 352)."""
    img = nib.Nifti1Image(data, np.diag([0.8, 0.7, 1.5, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment, padded" * 5))
    img.set_qform(img.affine, code=1)
    nib.save(img, path)
    return path


@pytest.mark.parametrize(
    "layout", ["extension", "4d-of-one", "nifti2", "two-members", "bytes-after", "uncompressed"]
)
def test_stored_voxels_read_from_the_bytes_equal_nibabel(tmp_path: Path, layout: str) -> None:
    """The loader's view of the decoded bytes is the array nibabel reads from the file."""
    rng = np.random.default_rng(11)
    # big enough that nibabel reads its header without reaching bytes after the stream
    data = rng.integers(-1024, 3000, (48, 40, 32)).astype(np.int16)
    path = tmp_path / ("x.nii" if layout == "uncompressed" else "x.nii.gz")
    if layout == "extension":
        _with_extension(path, data)
        assert nib.load(path).dataobj.offset > 352
    elif layout == "4d-of-one":
        save_nifti(path, data[..., None])
    elif layout == "nifti2":
        img2 = nib.Nifti2Image(data, np.diag([0.8, 0.7, 1.5, 1.0]))
        img2.set_qform(img2.affine, code=1)
        nib.save(img2, path)
    else:
        save_nifti(path, data)
    if layout == "two-members":  # what bgzip and concatenated gzip files hold
        whole = gzip.decompress(path.read_bytes())
        cut = len(whole) // 3
        path.write_bytes(gzip.compress(whole[:cut]) + gzip.compress(whole[cut:]))
    if layout == "bytes-after":  # not zeros: igzip.decompress would refuse them
        path.write_bytes(path.read_bytes() + b"trailing bytes" * 8)
    raw = path.read_bytes()
    img = open_nifti(path, "image", 10**6, raw=raw)
    got = read_nifti(img, path, "image", labels=False, raw=raw)
    reference = np.asarray(nib.load(path).dataobj).reshape(data.shape)
    np.testing.assert_array_equal(got.data, data)
    np.testing.assert_array_equal(got.data, reference)
    assert got.data.dtype == reference.dtype


def test_nifti2_from_bytes(tmp_path: Path) -> None:
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti2Image(data, np.eye(4)), path)
    img = nifti_from_bytes(path.read_bytes())
    assert isinstance(img, nib.Nifti2Image)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_is_a_read_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    data = np.random.default_rng(0).integers(-1000, 2000, (30, 30, 30)).astype(np.int16)
    path = save_nifti(tmp_path / "x.nii.gz", data)
    raw = path.read_bytes()
    half = len(raw) // 2
    raw = raw[:half] if damage == "truncated" else raw[:half] + bytes(64) + raw[half + 64 :]
    with pytest.raises((OSError, EOFError)), gzip.open(io.BytesIO(raw)) as handle:  # zlib too
        handle.read()
    img = open_nifti(path, "image", 10**6, raw=raw)
    for given in (None, raw):  # nibabel's read, and the view of the decoded bytes
        with pytest.raises(InputError, match=r"x\.nii\.gz.*copy or export it again"):
            read_nifti(img, path, "image", labels=False, raw=given)


# ------------------------------------------------------------- compact HU


def test_compact_hu_keeps_every_value() -> None:
    whole = np.array([-1024.0, 0.0, 3071.0], dtype=np.float32)
    assert compact_hu(whole).dtype == np.int16
    np.testing.assert_array_equal(compact_hu(whole), whole)
    wide = np.array([-1024, 40000], dtype=np.int32)  # beyond int16: kept exact as float32
    assert compact_hu(wide).dtype == np.float32
    np.testing.assert_array_equal(compact_hu(wide), wide)
    assert compact_hu(np.array([1, 2], dtype=np.uint16)).dtype == np.int16
    fractional = np.array([-1000.5, 20.25], dtype=np.float32)
    assert compact_hu(fractional).dtype == np.float32
    np.testing.assert_array_equal(compact_hu(fractional), fractional)
    assert compact_hu(np.array([7e4, 1.0], dtype=np.float64)).dtype == np.float32


# ------------------------------------------------------------- the loader's row


def _row(image: Path, mask: Path, labels: str = "tibia=1,femur=2") -> dict[str, Any]:
    return {
        "subject_id": "s1",
        "cohort": "all",
        "image": str(image),
        "mask": str(mask),
        "labels": labels,
    }


def _nifti_pair(folder: Path, hu: np.ndarray | None = None) -> tuple[Path, Path]:
    base, labels, affine = anatomy()
    image = base.astype(np.int16) if hu is None else hu
    return (
        save_nifti(folder / "ct.nii.gz", image, affine),
        save_nifti(folder / "seg.nii.gz", labels, affine),
    )


@pytest.mark.parametrize(
    "preprocess",
    [
        PreprocessConfig(),
        PreprocessConfig(target_spacing=(1.2, 0.6, 0.7)),
        PreprocessConfig(target_spacing=(2.0, 1.0, 1.2), crop_margin_mm=3.0),
    ],
    ids=["as-stored", "spacing", "spacing-crop"],
)
def test_the_loader_hands_over_int16_hu_and_uint8_regions_without_pickle(
    tmp_path: Path, preprocess: PreprocessConfig
) -> None:
    image, mask = _nifti_pair(tmp_path)
    row = load_subject(_row(image, mask), RunConfig(preprocess=preprocess), "id", frozenset())
    assert row["status"] == READY, row["message"]
    assert row["hu"].dtype == np.int16, "the loader handed over a float image"
    assert row["hu_float"].size == 0, "the loader handed over a float image"
    assert row["planes"].dtype == np.uint8 and row["planes"].ndim == 4
    assert "payload" not in row
    for name, value in row.items():  # nothing pickled travels: no byte strings at all
        assert not isinstance(value, bytes | bytearray | memoryview), name
        if isinstance(value, str):
            assert not value.startswith("\x80"), name  # a pickle's first byte, as text
    stored = nib.load(image).get_fdata()
    if preprocess.target_spacing is None:
        voxels = row["hu"].size
        assert handed_bytes(row) == 3 * voxels  # 2 B of HU + 1 B of regions per voxel
        assert sorted(np.unique(row["hu"])) == sorted(np.unique(stored).astype(np.int16))
    else:  # the stored integers (a window of them), not resampled floats
        assert row["hu"].size <= stored.size
        assert set(np.unique(row["hu"])) <= set(np.unique(stored).astype(np.int16))
        assert handed_bytes(row) == 2 * row["hu"].size + row["planes"].size


def test_an_image_of_fractional_floats_is_handed_over_as_float32(tmp_path: Path) -> None:
    base, _, _ = anatomy()
    image, mask = _nifti_pair(tmp_path, (base + 0.25).astype(np.float32))
    row = load_subject(_row(image, mask), RunConfig(), "id", frozenset())
    assert row["status"] == READY and row["hu_float"].dtype == np.float32  # the honest fallback
    assert row["hu"].size == 0 and row["hu_float"].size == row["planes"][0].size


def test_cached_and_failed_rows_carry_empty_arrays(tmp_path: Path) -> None:
    image, mask = _nifti_pair(tmp_path)
    failed = load_subject(_row(image, tmp_path / "no.nii.gz"), RunConfig(), "id", frozenset())
    assert failed["status"] == "failed"
    ready = load_subject(_row(image, mask), RunConfig(), "id", frozenset())
    cached = load_subject(_row(image, mask), RunConfig(), "id", frozenset({ready["key"]}))
    assert cached["status"] == "cached"
    for row in (failed, cached):
        assert (
            set(COLUMNS) <= set(row)
            and row["hu"].size == 0
            and row["hu_float"].size == 0
            and row["planes"].ndim == 4
        )


# ------------------------------------------------------------- same vectors


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return build_network("densenet121", random_weights("densenet121", 3).state_dict)[0]


def reference(
    network: torch.nn.Module, image: Path, mask: Path, labels: LabelMap, cfg: RunConfig
) -> dict[tuple[str, str], np.ndarray]:
    """The numpy float path as it was: prepare() (window and normalisation in numpy),
    then the pooling on its float32 input."""
    prepared = prepare(image, mask, labels, cfg.regions.background, cfg.preprocess)
    extractor = FeatureExtractor(network, resolve_layers(network, cfg.model.layers))
    pooled = extract(
        extractor,
        torch.from_numpy(prepared.image),
        torch.from_numpy(np.ascontiguousarray(prepared.region_index)),
        prepared.region_names,
        cfg.pooling,
        prepared.air,
    )
    return {(v.region, v.layer): v.vector for v in pooled}


def handed_over(
    network: torch.nn.Module, row: dict[str, Any], cfg: RunConfig
) -> dict[tuple[str, str], np.ndarray]:
    loaded = load_subject(row, cfg, "id", frozenset())
    assert loaded["status"] == READY, loaded["message"]
    for name in ARRAYS:  # as Ray hands them over: read-only views
        loaded[name] = loaded[name].copy()
        loaded[name].flags.writeable = False
    result = Features(network, cfg, None, "test")(loaded)
    assert result["status"] == "done", result["message"]
    return {(v.region, v.layer): v.vector for v, _ in pickle.loads(result["features"])}


def assert_close(got: dict[Any, np.ndarray], expected: dict[Any, np.ndarray]) -> None:
    assert got.keys() == expected.keys() and got
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, rtol=RTOL, atol=0, err_msg=str(key))


def config(
    pooling: str = "masked-pool",
    spacing: tuple[float, float, float] | None = None,
    crop: float | None = None,
    normalise: str = "fixed",
) -> RunConfig:
    return RunConfig(
        preprocess=PreprocessConfig(
            target_spacing=spacing, crop_margin_mm=crop, normalise=normalise
        ),
        model=ModelConfig(layers=SHALLOW, weights="random"),
        pooling=PoolingConfig(mode=pooling),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "cfg",
    [
        config(),
        config("masked-input"),
        config("masked-gem"),
        config(spacing=(1.2, 0.6, 0.7)),
        config(crop=6.0),
        config("masked-input", spacing=(2.0, 1.0, 1.2), crop=3.0),
        config(normalise="foreground"),
    ],
    ids=["pool", "input", "gem", "spacing", "crop", "input-spacing-crop", "foreground"],
)
def test_nifti_pair_equals_the_numpy_reference(
    network: torch.nn.Module, tmp_path: Path, cfg: RunConfig
) -> None:
    image, mask = _nifti_pair(tmp_path)
    got = handed_over(network, _row(image, mask), cfg)
    assert_close(got, reference(network, image, mask, LABELS, cfg))


def test_the_reference_can_tell_a_wrong_window(network: torch.nn.Module, tmp_path: Path) -> None:
    """The comparison above can fail: another HU window gives other vectors."""
    image, mask = _nifti_pair(tmp_path)
    got = handed_over(network, _row(image, mask), config())
    other = RunConfig(
        preprocess=PreprocessConfig(hu_min=-900.0),
        model=ModelConfig(layers=SHALLOW, weights="random"),
    )
    with pytest.raises(AssertionError):
        assert_close(got, reference(network, image, mask, LABELS, other))


@pytest.mark.parametrize("spacing", [None, (1.3, 0.7, 0.9)], ids=["stored", "spacing"])
@pytest.mark.parametrize("kind", ["nrrd", "mha", "folder", "seg.nrrd", "float"])
def test_every_input_kind_equals_the_numpy_reference(
    network: torch.nn.Module,
    tmp_path: Path,
    kind: str,
    spacing: tuple[float, float, float] | None,
) -> None:
    hu, labels, affine = anatomy()
    text, names = "tibia=1,femur=2", LABELS
    if kind in ("nrrd", "mha"):
        image = write_itk(tmp_path / f"ct.{kind}", hu.astype(np.int16), affine)
        mask = write_itk(tmp_path / f"seg.{kind}", labels, affine)
    elif kind == "float":  # fractional HU stored as float32: handed over as float32
        image = save_nifti(tmp_path / "ct.nii.gz", hu + np.float32(0.5), affine)
        mask = save_nifti(tmp_path / "seg.nii.gz", labels, affine)
    else:
        image = save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
        text, names = "tibia,femur", (("tibia", None), ("femur", None))
        if kind == "folder":
            mask = tmp_path / "masks"
            mask.mkdir()
            for name, value in LABELS:
                save_nifti(mask / f"{name}.nii.gz", (labels == value).astype(np.uint8), affine)
        else:
            layers = np.stack([(labels == 2).astype(np.uint8), (labels == 1).astype(np.uint8)])
            fields = segment(0, "femur", 0, 1) + segment(1, "tibia", 1, 1)
            mask = write_seg_nrrd(tmp_path / "knee.seg.nrrd", layers, affine, fields)
    cfg = config("masked-input", spacing=spacing, crop=2.0)
    got = handed_over(network, _row(image, mask, text), cfg)
    assert_close(got, reference(network, image, mask, names, cfg))


@pytest.mark.parametrize("spacing", [None, (2.5, 1.0, 1.0)], ids=["stored", "spacing"])
def test_a_dicom_series_equals_the_numpy_reference(
    network: torch.nn.Module, tmp_path: Path, spacing: tuple[float, float, float] | None
) -> None:
    if not DICOM.is_dir():
        pytest.skip(f"real data not found at {DICOM}")
    from cohort.inputs.readers import open_image

    volume = open_image(DICOM, 10**8)()
    labels = np.zeros(volume.data.shape, dtype=np.uint8)  # stored (column, row, slice) order
    labels[200:240, 220:260, 2:12] = 1
    labels[250:280, 230:270, 8:18] = 2
    mask = save_nifti(tmp_path / "seg.nii.gz", labels, volume.affine)
    cfg = config(spacing=spacing, crop=4.0)
    got = handed_over(network, _row(DICOM, mask), cfg)
    assert_close(got, reference(network, DICOM, mask, LABELS, cfg))


def test_device_feed_on_the_cpu_shares_the_read_only_arrays_silently() -> None:
    from cohort.model.transfer import DeviceFeed

    hu = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    hu.flags.writeable = False  # as the object store hands it over
    feed = DeviceFeed(torch.device("cpu"))
    assert not feed.ahead  # nothing to overlap on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning would fail here
        (tensor,) = feed.now([hu])
    assert tensor.dtype == torch.int16 and np.shares_memory(tensor.numpy(), hu)
    with pytest.raises(RuntimeError, match="CUDA"):
        feed.start([hu])


@pytest.mark.parametrize(
    "slab", [7, 4096, 1 << 21], ids=["slabs-of-7", "slabs-of-4096", "one-slab"]
)
def test_the_foreground_statistics_in_slabs_equal_numpy_whole(
    monkeypatch: pytest.MonkeyPatch, slab: int
) -> None:
    """--normalise foreground on the device sums its slabs (float64, two passes): the image
    equals numpy's reference (the foreground gathered whole, numpy's mean and std) within
    1e-6, and the value of air with it."""
    from cohort.inputs.preprocess import normalise_intensity
    from cohort.model import intensity, preparation

    monkeypatch.setattr(preparation, "STATS_VOXELS", slab)
    rng = np.random.default_rng(4)
    hu = rng.normal(200.0, 400.0, (23, 31, 37)).round().astype(np.int16)
    cfg = PreprocessConfig(normalise="foreground", foreground_hu=-100.0)
    reference, air = normalise_intensity(hu, cfg)
    got, got_air = intensity.normalise_hu(torch.from_numpy(hu), cfg)
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-6, atol=1e-6)
    assert got_air == pytest.approx(air, rel=1e-12)
    flat = np.full((4, 4, 4), 300, dtype=np.int16)  # one value above the threshold: no z-score
    with pytest.raises(InputError, match=r"64 voxels of one value above -100 HU"):
        intensity.normalise_hu(torch.from_numpy(flat), cfg, "image x.nii")
    with pytest.raises(InputError, match=r"no voxel above -100 HU"):
        intensity.normalise_hu(torch.from_numpy(flat - 1000), cfg, "image x.nii")
