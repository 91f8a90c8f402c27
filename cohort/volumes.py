"""NIfTI I/O, grid checks, orientation, resampling, cropping and the HU window.

Three stages the pipeline runs separately, so a failure is labelled with its
stage: :func:`load_pair` ("load"), :func:`check_pair` ("check") and
:func:`preprocess_pair` ("preprocess"). Pure numpy + nibabel + scipy.

Array convention of the output: axes (D, H, W) of the RAS+ volume, i.e. the
RAS array axes (x, y, z) become (z, y, x). Index order along each axis:
D inferior -> superior, H posterior -> anterior, W left -> right.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from cohort.config import BACKGROUND, LabelMap, PreprocessConfig
from cohort.errors import ConfigError, GeometryError, InputError, RegionError

NO_REGION = 255  # region_index value of voxels in no region (background off)
MAX_REGIONS = NO_REGION  # region ids 0..254
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


@dataclass(frozen=True, eq=False)
class VolumePair:
    """An image and its mask as stored on disk (original orientation)."""

    image: np.ndarray  # float32, HU after scl_slope/scl_inter
    mask: np.ndarray  # integer labels, same dtype as stored (int64 if stored as float)
    image_affine: np.ndarray  # 4x4 voxel -> mm (scanner RAS), as stored
    mask_affine: np.ndarray  # 4x4, as stored
    image_path: Path
    mask_path: Path


@dataclass(frozen=True, eq=False)
class Prepared:
    """One subject ready for the model: normalised image and region index, (D, H, W)."""

    image: np.ndarray  # float32 (D,H,W) normalised model input
    region_index: np.ndarray  # uint8 (D,H,W): r = region r, 255 = no region (background off)
    region_names: tuple[str, ...]  # named labels in LabelMap order, then "background" if on
    voxels: tuple[int, ...]  # voxel count per region
    spacing_mm: tuple[float, float, float]  # along D, H, W
    original_orientation: str  # axis codes of the stored image, e.g. "LPS"


# ---------------------------------------------------------------- stage: load


def load_pair(image: Path, mask: Path, cfg: PreprocessConfig) -> VolumePair:
    """Read an image and its mask; headers are checked before any data is read.

    Raises :class:`InputError` (or :class:`GeometryError` for non-3D shapes)
    naming the file and the fix.
    """
    image, mask = Path(image), Path(mask)
    image_img = _open(image, "image", cfg)
    mask_img = _open(mask, "mask", cfg)
    image_data = _read(image_img, image, "image", as_float=True)
    mask_data = _read(mask_img, mask, "mask", as_float=False)
    return VolumePair(
        image=image_data,
        mask=_as_labels(mask_data, mask),
        image_affine=np.asarray(image_img.affine, dtype=np.float64),
        mask_affine=np.asarray(mask_img.affine, dtype=np.float64),
        image_path=image,
        mask_path=mask,
    )


def _open(path: Path, role: str, cfg: PreprocessConfig) -> nib.Nifti1Image:
    """Open a NIfTI header (no voxel data) and check its shape and size."""
    if not path.is_file():
        raise InputError(
            f"{role} file {path} does not exist or is not a file; fix the path in the manifest"
        )
    try:
        img = nib.load(path, mmap=False)
    except _READ_ERRORS as exc:
        raise InputError(
            f"{role} file {path} is not a readable NIfTI file ({type(exc).__name__}: {exc}); "
            "convert it to .nii or .nii.gz"
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(
            f"{role} file {path} is a {type(img).__name__}, not NIfTI; "
            "convert it to .nii or .nii.gz"
        )
    shape = tuple(int(n) for n in img.shape)
    count = math.prod(shape)
    if count > cfg.max_voxels:
        raise InputError(
            f"{role} file {path} has {_fmt_shape(shape)} = {count:,} voxels, more than the "
            f"limit of {cfg.max_voxels:,}; crop or downsample it first, or raise the "
            "limit with --max-voxels"
        )
    squeezed = _squeezed_shape(shape)
    if len(squeezed) > 3:
        raise GeometryError(
            f"{role} file {path} has shape {_fmt_shape(shape)}, a {len(squeezed)}D series; "
            "cohort needs one 3D volume per file: split the series into 3D files"
        )
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise GeometryError(
            f"{role} file {path} has shape {_fmt_shape(shape)}, a 2D slice; cohort needs "
            "one 3D volume per file: stack the slices into one volume"
        )
    return img


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third (X, Y, Z, 1 -> X, Y, Z)."""
    out = list(shape)
    while len(out) > 3 and out[-1] == 1:
        out.pop()
    return tuple(out)


def _read(img: nib.Nifti1Image, path: Path, role: str, as_float: bool) -> np.ndarray:
    """Read the voxel data as a 3D array: float32 HU after scl_slope/scl_inter, or as stored."""
    try:
        data = img.get_fdata(dtype=np.float32) if as_float else np.asarray(img.dataobj)
    except (*_READ_ERRORS, TypeError) as exc:
        raise InputError(
            f"{role} file {path}: the header is readable but the voxel data are not "
            f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt, "
            "copy or export it again"
        ) from None
    return data.reshape(_squeezed_shape(data.shape))


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Mask voxels as integers; non-integer values are an error."""
    if np.issubdtype(data.dtype, np.integer):
        return data
    if not np.issubdtype(data.dtype, np.floating):
        raise InputError(
            f"mask file {path} holds {data.dtype} values; a label mask must hold integers, "
            "save it as uint8/int16"
        )
    finite = np.isfinite(data)
    whole = finite & (data == np.round(data))
    bad = int(data.size - np.count_nonzero(whole))
    if bad:
        example = data[~whole].flat[0]
        raise InputError(
            f"mask file {path} has {bad:,} non-integer voxel values (e.g. {example!r}); "
            "a label mask must hold whole numbers: save it as an integer type, or round it "
            "if it was interpolated"
        )
    return data.astype(np.int64)


# --------------------------------------------------------------- stage: check


def check_pair(pair: VolumePair, labels: LabelMap, cfg: PreprocessConfig) -> None:
    """Image and mask share a grid, the image is finite, every named label is present."""
    if pair.image.shape != pair.mask.shape:
        raise GeometryError(
            f"mask grid {_fmt_shape(pair.mask.shape)} ({pair.mask_path}) does not match image "
            f"grid {_fmt_shape(pair.image.shape)} ({pair.image_path}); resample the mask or "
            "fix the manifest"
        )
    difference = float(np.max(np.abs(pair.image_affine[:3, :] - pair.mask_affine[:3, :])))
    if not difference <= cfg.affine_tolerance_mm:
        raise GeometryError(
            f"mask affine of {pair.mask_path} differs from image affine of {pair.image_path} "
            f"by up to {difference:.6g} mm (tolerance {cfg.affine_tolerance_mm:g} mm); "
            f"image affine {_fmt_affine(pair.image_affine)}, "
            f"mask affine {_fmt_affine(pair.mask_affine)}; "
            "resample the mask or fix the manifest"
        )
    not_finite = int(pair.image.size - np.count_nonzero(np.isfinite(pair.image)))
    if not_finite:
        raise InputError(
            f"image file {pair.image_path} has {not_finite:,} NaN or infinite voxels; "
            "replace them (e.g. with -1000 HU) before the analysis"
        )
    for name, value in labels:
        if not np.any(pair.mask == value):
            raise RegionError(
                f"mask file {pair.mask_path} has no voxel with value {value} (label {name!r}); "
                f"values present: {_present_values(pair.mask)}; if this mask numbers its "
                "labels differently, give the row a `labels` map in the manifest "
                "(e.g. tibia=2,femur=1)"
            )


def _present_values(mask: np.ndarray, limit: int = 20) -> str:
    values = np.unique(mask)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({values.size} in all)" if values.size > limit else "")


# ---------------------------------------------------------- stage: preprocess


def preprocess_pair(
    pair: VolumePair, labels: LabelMap, background: bool, cfg: PreprocessConfig
) -> Prepared:
    """Reorient to RAS+ (D, H, W), resample, crop, window and normalise; build regions.

    Assumes :func:`check_pair` passed (the image affine is used for both arrays).
    """
    n_regions = len(labels) + (1 if background else 0)
    if n_regions > MAX_REGIONS:
        raise ConfigError(f"{n_regions} regions requested; at most {MAX_REGIONS} are supported")
    orientation = "".join(str(c) for c in nib.aff2axcodes(pair.image_affine))
    image, spacing = to_dhw(pair.image, pair.image_affine)
    mask, _ = to_dhw(pair.mask, pair.image_affine)
    if cfg.target_spacing is not None:
        target = (
            float(cfg.target_spacing[0]),
            float(cfg.target_spacing[1]),
            float(cfg.target_spacing[2]),
        )
        image = resample_image(image, spacing, target)
        mask = resample_mask(mask, spacing, target)
        spacing = target
    named = np.isin(mask, np.array([value for _, value in labels]))
    if cfg.crop_margin_mm is not None:
        box = crop_box(named, spacing, cfg.crop_margin_mm)
        image, mask, named = image[box], mask[box], named[box]
    region_index = np.full(mask.shape, NO_REGION, dtype=np.uint8)
    names: list[str] = []
    for r, (name, value) in enumerate(labels):
        region_index[mask == value] = r
        names.append(name)
    if background:
        region_index[~named] = len(labels)
        names.append(BACKGROUND)
    counts = np.bincount(region_index.ravel(), minlength=NO_REGION + 1)
    voxels = tuple(int(counts[r]) for r in range(len(names)))
    for name, count in zip(names, voxels, strict=True):
        if count == 0:
            raise RegionError(
                f"region {name!r} of mask file {pair.mask_path} has no voxels after "
                f"resampling/cropping (grid {_fmt_shape(region_index.shape)}); use a finer "
                "target spacing or a larger crop margin, or check the label map"
            )
    return Prepared(
        image=np.ascontiguousarray(window_normalise(image, cfg)),
        region_index=np.ascontiguousarray(region_index),
        region_names=tuple(names),
        voxels=voxels,
        spacing_mm=spacing,
        original_orientation=orientation,
    )


def to_dhw(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a stored 3D array to RAS+ (closest canonical) and order axes (D, H, W).

    Returns a view of ``array`` and the voxel spacing in mm along (D, H, W).
    """
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    sizes = np.linalg.norm(ras_affine[:3, :3], axis=0)  # mm per step along x, y, z
    return ras.transpose(2, 1, 0), (float(sizes[2]), float(sizes[1]), float(sizes[0]))


def resampled_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """Grid size covering the same extent at ``target`` spacing (rounded, at least 1)."""
    d, h, w = (
        max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target, strict=True)
    )
    return d, h, w


def resample_image(
    image: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...]
) -> np.ndarray:
    """Trilinear resampling; the grids share their first corner, output voxel i samples
    input index ``(i + 0.5) * target / spacing - 0.5`` (edges repeat)."""
    from scipy import ndimage  # here, not at the top: loaders that never resample skip it

    ratio = np.array([t / s for s, t in zip(spacing, target, strict=True)])
    out = ndimage.affine_transform(
        np.asarray(image, dtype=np.float32),
        ratio,
        offset=0.5 * ratio - 0.5,
        output_shape=resampled_shape(image.shape, spacing, target),
        order=1,
        mode="nearest",
    )
    return np.asarray(out, dtype=np.float32)


def resample_mask(
    mask: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...]
) -> np.ndarray:
    """Nearest-neighbour resampling: output voxel i takes the input voxel containing its
    centre, index ``floor((i + 0.5) * target / spacing)``."""
    shape = resampled_shape(mask.shape, spacing, target)
    index = [
        np.clip(np.floor((np.arange(m) + 0.5) * (t / s) + 1e-9).astype(np.intp), 0, n - 1)
        for m, n, s, t in zip(shape, mask.shape, spacing, target, strict=True)
    ]
    return mask[np.ix_(*index)]


def crop_box(
    named: np.ndarray, spacing: tuple[float, ...], margin_mm: float
) -> tuple[slice, slice, slice]:
    """Bounding box of ``named`` plus ``ceil(margin / spacing)`` voxels per side, clipped."""
    box: list[slice] = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(named, axis=others))
        if hits.size == 0:
            return (slice(0, 0), slice(0, 0), slice(0, 0))
        pad = math.ceil(margin_mm / spacing[axis] - 1e-9)
        box.append(
            slice(max(0, int(hits[0]) - pad), min(named.shape[axis], int(hits[-1]) + pad + 1))
        )
    return box[0], box[1], box[2]


def window_normalise(hu: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Clip HU to [hu_min, hu_max], scale to [0, 1], then (x - mean) / std; float32."""
    with np.errstate(all="raise", under="ignore"):
        x = np.clip(np.asarray(hu, dtype=np.float32), cfg.hu_min, cfg.hu_max)
        x -= np.float32(cfg.hu_min)
        x /= np.float32(cfg.hu_max - cfg.hu_min)
        x -= np.float32(cfg.mean)
        x /= np.float32(cfg.std)
    return x


def air_value(cfg: PreprocessConfig) -> float:
    """The normalised value of the window's low end (air), ``(0 - mean) / std``."""
    return (0.0 - cfg.mean) / cfg.std


def prepare_subject(
    image: Path, mask: Path, labels: LabelMap, background: bool, cfg: PreprocessConfig
) -> Prepared:
    """Load, check and preprocess one subject (the three stages chained)."""
    pair = load_pair(image, mask, cfg)
    check_pair(pair, labels, cfg)
    return preprocess_pair(pair, labels, background, cfg)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(n)) for n in shape)


def _fmt_affine(affine: np.ndarray) -> str:
    """The top three rows of an affine on one line, rounded to 1e-4 mm."""
    rows = np.round(np.asarray(affine, dtype=np.float64)[:3], 4) + 0.0  # + 0.0 drops -0.0
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in row) + "]" for row in rows) + "]"
