"""Stage "preprocess": reorient, resample, crop, window and normalise; build regions.

Pure numpy + nibabel (scipy only when resampling). The output
:class:`Prepared` is what the model stage receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from cohort.config import BACKGROUND, LabelMap, PreprocessConfig
from cohort.errors import ConfigError, RegionError
from cohort.inputs.geometry import to_dhw
from cohort.inputs.volume import VolumePair, fmt_shape

__all__ = [
    "Prepared",
    "air_value",
    "crop_box",
    "preprocess_pair",
    "resample_image",
    "resample_mask",
    "resampled_shape",
    "window_normalise",
]

NO_REGION = 255  # region_index value of voxels in no region (background off)
MAX_REGIONS = NO_REGION  # region ids 0..254


@dataclass(frozen=True, eq=False)
class Prepared:
    """One subject ready for the model: normalised image and region index, (D, H, W)."""

    image: np.ndarray  # float32 (D,H,W) normalised model input
    region_index: np.ndarray  # uint8 (D,H,W): r = region r, 255 = no region (background off)
    region_names: tuple[str, ...]  # named labels in LabelMap order, then "background" if on
    voxels: tuple[int, ...]  # voxel count per region
    spacing_mm: tuple[float, float, float]  # along D, H, W
    original_orientation: str  # axis codes of the stored image, e.g. "LPS"


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
                f"resampling/cropping (grid {fmt_shape(region_index.shape)}); use a finer "
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
