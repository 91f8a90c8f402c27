"""Stage "preprocess": reorient, put the mask on the image grid, resample, crop, window
and normalise, orient the axes as the backbone's preset says; build the region index.

Pure numpy + nibabel (scipy only when resampling the image). :func:`place_pair`
does everything but the intensity work and gives a :class:`Placed` subject: the
image in HU as read (2 bytes per voxel for int16 CT) and a uint8 region index
(:mod:`cohort.inputs.regions`), one byte per voxel when the regions are
disjoint, one more per extra plane when they overlap; this is what the
pipeline's loaders hand to the feature actors. :func:`preprocess_pair` adds the
HU window and normalisation in numpy and gives :class:`Prepared`, a float32
model input (the reference of the actors' device-side intensity step, and what
scripts and ``cohort validate`` use).

With ``--spacing``, the loaders' :func:`place_pair` (``defer=True``) leaves the
image's trilinear resampling to the feature actor's device as well: the placed
image is then the window of the stored image (its own grid, its own integers)
that the cropped model grid samples, and :class:`Deferred` says how to sample
it (:func:`sample_points`, the points and weights of
:func:`resample_image`'s ``scipy.ndimage`` interpolation; the device code is
:func:`cohort.model.intensity.resample_hu`). The region index is resampled,
cropped and flipped by the loader either way.
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
    label_plane,
    region_counts,
    stack,
)
from cohort.inputs.segmentation import LabelRegions, check_label_kind
from cohort.inputs.volume import fmt_shape

__all__ = [
    "NO_REGION",
    "Deferred",
    "Placed",
    "Prepared",
    "air_value",
    "axis_flips",
    "crop_box",
    "normalise_intensity",
    "place_pair",
    "preprocess_pair",
    "resample_image",
    "resample_mask",
    "resampled_shape",
    "sample_points",
    "sample_window",
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


@dataclass(frozen=True)
class Deferred:
    """The trilinear resampling (``--spacing``) of a placed image, left to the device.

    Output voxel ``i`` along an axis is voxel ``start + i`` of the whole resampled
    grid and samples the whole image at ``ratio * (start + i) + (ratio - 1) / 2``
    (:func:`resample_image`); the placed image is the window of the whole image
    (shape ``extent``) from ``origin`` on that these points need. After resampling,
    the axes ``flips`` are reversed.
    """

    ratio: tuple[float, float, float]  # target spacing over the image's, along D, H, W
    start: tuple[int, int, int]  # first output voxel in the whole resampled grid (the crop)
    shape: tuple[int, int, int]  # the output: the model input's grid, before flipping
    origin: tuple[int, int, int]  # the window's first voxel in the whole image
    extent: tuple[int, int, int]  # the whole image's shape
    flips: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class Placed:
    """One subject on the model's grid before any intensity work, (D, H, W): the image in
    HU as read (the stored integers, or float32 where the image was stored as floats or
    has been resampled), and the region index. :func:`preprocess_pair` windows and
    normalises it; the pipeline hands it to the feature actor, which does that on the
    network's device (:mod:`cohort.inputs.handover`)."""

    hu: np.ndarray  # (D,H,W) HU, axes as PreprocessConfig.axes; integers or float32
    region_index: np.ndarray  # as Prepared.region_index
    region_names: tuple[str, ...]
    voxels: tuple[int, ...]
    spacing_mm: tuple[float, float, float]
    original_orientation: str
    mask_resampled: bool = False
    # set: ``hu`` is a window of the stored image on its own grid, still to be resampled
    # (and flipped) as this says; the model input's grid is then the region index's
    deferred: Deferred | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model input's grid (D, H, W)."""
        d, h, w = (int(n) for n in self.region_index.shape[-3:])
        return d, h, w


def preprocess_pair(
    pair: VolumePair,
    labels: LabelMap,
    background: bool,
    cfg: PreprocessConfig,
    reach: Reach | None = None,
) -> Prepared:
    """Reorient to RAS+ (D, H, W), put the regions on the image grid, resample, crop,
    window and normalise, reverse the axes ``cfg.axes`` reverses; build the region index.

    :func:`place_pair`, then :func:`normalise_intensity` in numpy (float32): the
    reference the feature actor's device-side intensity step is tested against.
    """
    placed = place_pair(pair, labels, background, cfg, reach)
    image, air = normalise_intensity(placed.hu, cfg, f"image {pair.image_path}")
    return Prepared(
        image=np.ascontiguousarray(image),
        region_index=placed.region_index,
        region_names=placed.region_names,
        voxels=placed.voxels,
        spacing_mm=placed.spacing_mm,
        original_orientation=placed.original_orientation,
        air=air,
        mask_resampled=placed.mask_resampled,
    )


def place_pair(
    pair: VolumePair,
    labels: LabelMap,
    background: bool,
    cfg: PreprocessConfig,
    reach: Reach | None = None,
    defer: bool = False,
) -> Placed:
    """Reorient to RAS+ (D, H, W), put the regions on the image grid, resample, crop,
    reverse the axes ``cfg.axes`` reverses; build the region index. No intensity work.

    Assumes :func:`cohort.inputs.geometry.check_pair` passed. With ``reach``
    a crop that leaves the model input too small is an error. With ``defer`` and
    ``cfg.target_spacing``, the image is not resampled here: the result holds the
    window of the stored image the model grid samples and a :class:`Deferred`
    (the feature actor resamples on its device). A label map on the
    image's grid becomes its region index in one table lookup per voxel
    (:func:`cohort.inputs.regions.label_plane`); other masks one plane per
    region, stacked.
    """
    n_regions = len(labels) + (1 if background else 0)
    if n_regions > MAX_REGIONS:
        raise ConfigError(f"{n_regions} regions requested; at most {MAX_REGIONS} are supported")
    pair = align_pair(pair, cfg.affine_tolerance_mm)
    orientation = "".join(str(c) for c in nib.aff2axcodes(pair.image.affine))
    image_grid = dhw_grid(pair.image.shape, pair.image.affine)
    mask_grid = dhw_grid(pair.regions.shape, pair.regions.affine)
    image, spacing = to_dhw(pair.image.data, pair.image.affine)
    resampled = not same_grid(image_grid, mask_grid, cfg.affine_tolerance_mm)
    rest = len(labels) if background else NO_REGION  # what a voxel in no named region is
    planes, names, counted = _label_planes(pair, labels, rest) if not resampled else (None, [], ())
    if planes is None:
        selected = select_regions(pair.regions, labels)
        names = [name for name, _ in selected]
        planes = stack([to_dhw(mask, pair.regions.affine)[0] for _, mask in selected])
        rest = NO_REGION  # background is set below, after resampling and cropping
    if resampled:
        planes = np.stack(
            [
                nearest_onto(p, mask_grid.affine, image_grid.shape, image_grid.affine, NO_REGION)
                for p in planes
            ]
        )
    ratio: tuple[float, float, float] | None = None  # set: the image's resampling deferred
    if cfg.target_spacing is not None:
        target = (
            float(cfg.target_spacing[0]),
            float(cfg.target_spacing[1]),
            float(cfg.target_spacing[2]),
        )
        if defer:
            ratio = (target[0] / spacing[0], target[1] / spacing[1], target[2] / spacing[2])
        else:
            image = resample_image(image, spacing, target)
        planes = np.stack([resample_mask(p, spacing, target) for p in planes])
        spacing = target
        counted = ()  # the label map's counts were of its own grid
    box = (slice(None), slice(None), slice(None))
    if cfg.crop_margin_mm is not None:
        named = _named(planes, len(labels), rest)
        box = crop_box(named, spacing, cfg.crop_margin_mm)
        planes = planes[(slice(None), *box)]
        counted = ()
        if ratio is None:
            image = image[box]
        if reach is not None:
            d, h, w = (int(n) for n in planes.shape[1:])
            check_size((d, h, w), spacing, reach, pair.image_path, cropped=True)
    planes = np.ascontiguousarray(planes)
    if background:
        if rest == NO_REGION:
            planes[0][~_named(planes, len(labels), rest)] = len(labels)
        names.append(BACKGROUND)
    if counted:  # the label map's plane as it was made: its counts hold, and the rest's
        rest_count = (int(planes[0].size) - sum(counted),) if background else ()
        voxels = (*counted, *rest_count)
    else:  # before flipping: the counts do not change
        voxels = region_counts(planes, len(names))
    for name, count in zip(names, voxels, strict=True):
        if count == 0:
            raise RegionError(
                f"region {name!r} of mask {pair.mask_path} has no voxels after "
                f"resampling/cropping (grid {fmt_shape(planes.shape[1:])}); use a finer "
                "target spacing or a larger crop margin, or check the label map"
            )
    flips = axis_flips(cfg.axes)
    deferred = None
    if ratio is not None:
        image, deferred = sample_window(image, ratio, box, planes.shape[1:], flips)
    elif flips:
        image = np.flip(image, flips)
    if flips:
        planes = np.flip(planes, tuple(axis + 1 for axis in flips))
    return Placed(
        hu=np.ascontiguousarray(image),
        region_index=as_region_index(np.ascontiguousarray(planes)),
        region_names=tuple(names),
        voxels=voxels,
        spacing_mm=spacing,
        original_orientation=orientation,
        mask_resampled=resampled,
        deferred=deferred,
    )


def sample_window(
    image: np.ndarray,
    ratio: tuple[float, float, float],
    box: tuple[slice, slice, slice],
    shape: tuple[int, ...],
    flips: tuple[int, ...],
) -> tuple[np.ndarray, Deferred]:
    """The window of the whole ``image`` that the (cropped) resampled grid ``shape``,
    from ``box``'s start, samples; and its :class:`Deferred`."""
    starts = tuple(int(b.start or 0) for b in box)
    window = []
    for axis in range(3):
        first, second, _ = sample_points(
            ratio[axis], starts[axis], int(shape[axis]), 0, int(image.shape[axis])
        )
        window.append(slice(int(first.min()), int(second.max()) + 1))
    deferred = Deferred(
        ratio=ratio,
        start=(starts[0], starts[1], starts[2]),
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        origin=(int(window[0].start), int(window[1].start), int(window[2].start)),
        extent=(int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
        flips=flips,
    )
    return image[tuple(window)], deferred


def sample_points(
    ratio: float, start: int, count: int, origin: int, extent: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, for output voxels ``start`` .. ``start + count - 1`` of the
    resampled grid: the two voxels of the image each one interpolates between (as
    indices into a window beginning at image voxel ``origin``) and the float64 weight
    of the second, as :func:`resample_image` takes them: ``scipy.ndimage`` (1.x,
    ``zoom_shift``) computes the coordinate as ``(i + offset / ratio) * ratio`` and,
    for mode ``nearest``, clamps it to the image before its linear spline's weights."""
    shift = (0.5 * ratio - 0.5) / ratio
    coordinate = (np.arange(start, start + count, dtype=np.float64) + shift) * ratio
    coordinate = np.clip(coordinate, 0.0, float(extent - 1))
    below = np.floor(coordinate)
    weight = coordinate - below
    first = below.astype(np.intp)
    second = np.minimum(first + 1, extent - 1)
    return first - origin, second - origin, weight


def _label_planes(
    pair: VolumePair, labels: LabelMap, rest: int
) -> tuple[np.ndarray | None, list[str], tuple[int, ...]]:
    """A label map's (1, D, H, W) plane by one table lookup (background already ``rest``)
    and the voxels of each named region, or None where the regions must be stacked
    (named masks, repeated values, wide integers, a region with no voxel:
    :func:`select_regions` then says which)."""
    regions = pair.regions
    if not isinstance(regions, LabelRegions):
        return None, [], ()
    check_label_kind(regions.path, labels, by_name=False)
    values = [value for _, value in labels if value is not None]
    if len(values) != len(labels):
        return None, [], ()
    dhw, _ = to_dhw(regions.labels, regions.affine)
    made = label_plane(dhw, values, rest)
    if made is None:
        return None, [], ()
    plane, counts = made
    if not all(counts):
        return None, [], ()  # select_regions names the empty region
    return plane[np.newaxis], [name for name, _ in labels], counts


def _named(planes: np.ndarray, n_named: int, rest: int) -> np.ndarray:
    """Voxels in any named region of (P, D, H, W) planes, whose other voxels are ``rest``
    (:data:`NO_REGION`, or the background's id ``n_named`` in plane 0)."""
    if rest == NO_REGION:
        return np.any(planes != NO_REGION, axis=0)
    return planes[0] < n_named


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
