"""Stage "preprocess": reorient, put the mask on the image grid, resample, crop, window
and normalise, orient the axes as the backbone's preset says; build the region index.

Pure numpy + nibabel (scipy only when resampling the image). The output
:class:`Prepared` is what the model stage receives: a float32 image and a
uint8 region index (:mod:`cohort.inputs.regions`), 5 bytes per voxel when
the regions are disjoint, one more byte per voxel per extra plane when
regions overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from cohort.config import BACKGROUND, LabelMap, PreprocessConfig
from cohort.errors import ConfigError, InputError, RegionError
from cohort.inputs.geometry import (
    Reach,
    align_pair,
    check_size,
    dhw_grid,
    same_grid,
    select_regions,
    to_dhw,
)
from cohort.inputs.nearest import nearest_onto
from cohort.inputs.readers import VolumePair
from cohort.inputs.regions import (
    MAX_REGIONS,
    NO_REGION,
    as_region_index,
    region_counts,
    stack,
)
from cohort.inputs.volume import fmt_shape

__all__ = [
    "NO_REGION",
    "Prepared",
    "air_value",
    "axis_flips",
    "crop_box",
    "normalise_intensity",
    "preprocess_pair",
    "resample_image",
    "resample_mask",
    "resampled_shape",
    "window_normalise",
]


@dataclass(frozen=True, eq=False)
class Prepared:
    """One subject ready for the model: normalised image and region index, (D, H, W)."""

    image: np.ndarray  # float32 (D,H,W) normalised model input, axes as PreprocessConfig.axes
    # uint8 (D,H,W): r = region r, 255 = no region; (P,D,H,W) planes when regions overlap
    region_index: np.ndarray
    region_names: tuple[str, ...]  # named regions in label order, then "background" if on
    voxels: tuple[int, ...]  # voxel count per region
    spacing_mm: tuple[float, float, float]  # along D, H, W
    original_orientation: str  # axis codes of the stored image, e.g. "LPS"
    air: float  # the model-input value of the HU window's low end (masked-input's "air")
    mask_resampled: bool = False  # the mask was put on the image grid (--mask-resample)


def preprocess_pair(
    pair: VolumePair,
    labels: LabelMap,
    background: bool,
    cfg: PreprocessConfig,
    reach: Reach | None = None,
) -> Prepared:
    """Reorient to RAS+ (D, H, W), put the regions on the image grid, resample, crop,
    window and normalise, reverse the axes ``cfg.axes`` reverses; build the region index.

    Assumes :func:`cohort.inputs.geometry.check_pair` passed. With ``reach``
    a crop that leaves the model input too small is an error.
    """
    n_regions = len(labels) + (1 if background else 0)
    if n_regions > MAX_REGIONS:
        raise ConfigError(f"{n_regions} regions requested; at most {MAX_REGIONS} are supported")
    pair = align_pair(pair, cfg.affine_tolerance_mm)
    orientation = "".join(str(c) for c in nib.aff2axcodes(pair.image.affine))
    image_grid = dhw_grid(pair.image.shape, pair.image.affine)
    mask_grid = dhw_grid(pair.regions.shape, pair.regions.affine)
    image, spacing = to_dhw(pair.image.data, pair.image.affine)
    selected = select_regions(pair.regions, labels)
    planes = stack([to_dhw(mask, pair.regions.affine)[0] for _, mask in selected])
    resampled = not same_grid(image_grid, mask_grid, cfg.affine_tolerance_mm)
    if resampled:
        planes = np.stack(
            [
                nearest_onto(p, mask_grid.affine, image_grid.shape, image_grid.affine, NO_REGION)
                for p in planes
            ]
        )
    if cfg.target_spacing is not None:
        target = (
            float(cfg.target_spacing[0]),
            float(cfg.target_spacing[1]),
            float(cfg.target_spacing[2]),
        )
        image = resample_image(image, spacing, target)
        planes = np.stack([resample_mask(p, spacing, target) for p in planes])
        spacing = target
    named = np.any(planes != NO_REGION, axis=0)
    if cfg.crop_margin_mm is not None:
        box = crop_box(named, spacing, cfg.crop_margin_mm)
        image, planes, named = image[box], planes[(slice(None), *box)], named[box]
        if reach is not None:
            d, h, w = (int(n) for n in image.shape)
            check_size((d, h, w), spacing, reach, pair.image_path, cropped=True)
    planes = np.ascontiguousarray(planes)
    names = [name for name, _ in selected]
    if background:
        planes[0][~named] = len(labels)
        names.append(BACKGROUND)
    voxels = region_counts(planes, len(names))  # before flipping: the counts do not change
    for name, count in zip(names, voxels, strict=True):
        if count == 0:
            raise RegionError(
                f"region {name!r} of mask {pair.mask_path} has no voxels after "
                f"resampling/cropping (grid {fmt_shape(named.shape)}); use a finer "
                "target spacing or a larger crop margin, or check the label map"
            )
    image, air = normalise_intensity(image, cfg, f"image {pair.image_path}")
    flips = axis_flips(cfg.axes)
    if flips:
        image = np.flip(image, flips)
        planes = np.flip(planes, tuple(axis + 1 for axis in flips))
    return Prepared(
        image=np.ascontiguousarray(image),
        region_index=as_region_index(np.ascontiguousarray(planes)),
        region_names=tuple(names),
        voxels=voxels,
        spacing_mm=spacing,
        original_orientation=orientation,
        air=air,
        mask_resampled=resampled,
    )


def axis_flips(axes: str) -> tuple[int, ...]:
    """The array axes to reverse so that (D, H, W), in RAS+ ("SAR"), point as ``axes`` says."""
    return tuple(axis for axis in range(3) if axes[axis] != "SAR"[axis])


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
    """Clip HU to [hu_min, hu_max], scale to [0, 1], then normalise; float32."""
    return normalise_intensity(hu, cfg)[0]


def normalise_intensity(
    hu: np.ndarray, cfg: PreprocessConfig, origin: str = "the image"
) -> tuple[np.ndarray, float]:
    """Clip HU to [hu_min, hu_max] and scale to [0, 1]; then ``fixed``: (x - mean) / std,
    or ``foreground``: (x - m) / s with the mean m and standard deviation s of the voxels
    above ``foreground_hu`` (MedicalNet's z-score of the foreground). Returns the float32
    image and the value the window's low end (air) takes."""
    with np.errstate(all="raise", under="ignore"):
        x = np.clip(np.asarray(hu, dtype=np.float32), cfg.hu_min, cfg.hu_max)
        x -= np.float32(cfg.hu_min)
        x /= np.float32(cfg.hu_max - cfg.hu_min)
        if cfg.normalise == "fixed":
            mean, std = cfg.mean, cfg.std
        else:
            mean, std = _foreground_stats(x, cfg, origin)
        x -= np.float32(mean)
        x /= np.float32(std)
    return x, (0.0 - mean) / std


def _foreground_stats(x: np.ndarray, cfg: PreprocessConfig, origin: str) -> tuple[float, float]:
    """Mean and (population) standard deviation of the scaled voxels above ``foreground_hu``."""
    threshold = (cfg.foreground_hu - cfg.hu_min) / (cfg.hu_max - cfg.hu_min)
    foreground = x[x > np.float32(threshold)].astype(np.float64)
    std = float(foreground.std()) if foreground.size else 0.0
    if std == 0.0:
        found = "no voxel" if foreground.size == 0 else f"{foreground.size} voxels of one value"
        raise InputError(
            f"{origin} has {found} above {cfg.foreground_hu:g} HU after resampling and "
            "cropping, so the z-score of its foreground (--normalise foreground) is undefined; "
            "check that the image is in HU, or use --normalise fixed"
        )
    return float(foreground.mean()), std


def air_value(cfg: PreprocessConfig) -> float:
    """The normalised value of the window's low end (air), ``(0 - mean) / std``; with
    ``normalise="foreground"`` it depends on the volume (:attr:`Prepared.air`)."""
    if cfg.normalise != "fixed":
        raise ConfigError(
            "with normalise='foreground' the value of air depends on each volume's statistics; "
            "read it from the prepared subject (Prepared.air)"
        )
    return (0.0 - cfg.mean) / cfg.std
