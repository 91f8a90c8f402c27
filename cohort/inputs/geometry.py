"""Stage "check" and the array convention: grids, affines, orientation and size.

Array convention of every prepared volume: axes (D, H, W) of the RAS+ volume,
i.e. the RAS array axes (x, y, z) become (z, y, x). Index order along each
axis: D inferior -> superior, H posterior -> anterior, W left -> right.

Image and mask are compared as physical grids: two grids are the same when every
corner voxel centre agrees within the tolerance (1e-3 mm by default), whatever the
axis order or direction each is stored in. A mask on the image's grid stored
otherwise is re-indexed onto the image's stored axes (:func:`align_pair`; the
same voxels, no values change), so both then take the same way to RAS+. A mask
on another grid is an error, unless ``--mask-resample nearest``
(:attr:`PreprocessConfig.mask_resample`) puts it on the image's
(:mod:`cohort.inputs.nearest`). The model input must be large enough for every
hooked layer: :class:`Reach` holds the least input size of each, worked out on
the driver from the network (:mod:`cohort.model.reach`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from cohort.config import LabelMap, PreprocessConfig
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.nearest import count_outside
from cohort.inputs.readers import VolumePair
from cohort.inputs.segmentation import LabelRegions, Regions, check_label_kind, reindexed
from cohort.inputs.volume import axis_mapping, corner_distance, fmt_affine, fmt_shape

__all__ = [
    "AXES",
    "Grid",
    "LayerReach",
    "Reach",
    "align_pair",
    "check_pair",
    "check_size",
    "dhw_grid",
    "mask_resampled",
    "model_shape",
    "same_grid",
    "select_regions",
    "to_dhw",
]

AXES = ("D", "H", "W")
_AXIS_WORDS = ("D, inferior-superior", "H, posterior-anterior", "W, left-right")


@dataclass(frozen=True, eq=False)
class Grid:
    """A volume's grid in the RAS+ (D, H, W) frame."""

    shape: tuple[int, int, int]  # voxels along D, H, W
    affine: np.ndarray  # 4x4: (d, h, w, 1) -> RAS+ world mm

    @property
    def spacing(self) -> tuple[float, float, float]:
        d, h, w = (float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))
        return d, h, w


@dataclass(frozen=True)
class LayerReach:
    """The least model input a hooked layer needs: its output keeps one cell per axis."""

    layer: str  # the layer id as given ("conv-1") or a module path
    module_path: str  # e.g. "features.denseblock4.denselayer16.conv2"
    min_shape: tuple[int, int, int]  # least (D, H, W) input, voxels


@dataclass(frozen=True)
class Reach:
    """What the hooked layers need, and how far shallower stages of the network reach."""

    layers: tuple[LayerReach, ...]  # one per hooked layer
    stages: tuple[LayerReach, ...] = ()  # the network's stages in execution order (for fixes)


def to_dhw(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a stored 3D array to RAS+ (closest canonical) and order axes (D, H, W).

    Returns a view of ``array`` and the voxel spacing in mm along (D, H, W).
    """
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    grid = dhw_grid(array.shape, affine)
    return ras.transpose(2, 1, 0), grid.spacing


def dhw_grid(shape: tuple[int, ...], affine: np.ndarray) -> Grid:
    """The grid of a stored volume (shape (i, j, k), voxel -> RAS affine) in the (D, H, W) frame."""
    ornt = nib.orientations.io_orientation(affine)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    ras_shape = [0, 0, 0]
    for stored_axis, (ras_axis, _) in enumerate(ornt):
        ras_shape[int(ras_axis)] = int(shape[stored_axis])
    dhw = np.eye(4)
    dhw[:3, :3] = ras_affine[:3, :3][:, [2, 1, 0]]
    dhw[:3, 3] = ras_affine[:3, 3]
    return Grid((ras_shape[2], ras_shape[1], ras_shape[0]), dhw)


def same_grid(a: Grid, b: Grid, tolerance_mm: float) -> bool:
    """Same shape, and every corner voxel centre within ``tolerance_mm`` (in mm, so the
    far corner of a 512-voxel grid counts as the near one does)."""
    return a.shape == b.shape and _difference(a, b) <= tolerance_mm


def _difference(a: Grid, b: Grid) -> float:
    """The largest distance (mm) between the grids' corner voxel centres (same shape)."""
    return corner_distance(a.shape, a.affine, b.affine)


def align_pair(pair: VolumePair, tolerance_mm: float) -> VolumePair:
    """``pair`` with its regions re-indexed onto the image's stored axes and given the
    image's affine, when the mask's grid is the image's stored in another axis order
    or direction (:func:`cohort.inputs.volume.axis_mapping`); else ``pair`` as it is.

    Both then reorient to RAS+ the same way, also for a grid at exactly 45 degrees,
    where the closest canonical axes of two float-rounded copies may differ.
    """
    image, regions = pair.image, pair.regions
    if regions.shape == image.shape and np.array_equal(regions.affine, image.affine):
        return pair
    ornt = axis_mapping(regions.shape, regions.affine, image.shape, image.affine, tolerance_mm)
    if ornt is None:
        return pair
    return VolumePair(image=image, regions=reindexed(regions, ornt, image.affine))


def mask_resampled(pair: VolumePair, cfg: PreprocessConfig) -> bool:
    """Whether the mask is put on the image grid: it lies on another grid, and
    ``--mask-resample nearest`` allows it (else the check stage refuses the pair)."""
    pair = align_pair(pair, cfg.affine_tolerance_mm)
    image = dhw_grid(pair.image.shape, pair.image.affine)
    mask = dhw_grid(pair.regions.shape, pair.regions.affine)
    return cfg.mask_resample == "nearest" and not same_grid(image, mask, cfg.affine_tolerance_mm)


def model_shape(grid: Grid, cfg: PreprocessConfig) -> tuple[int, int, int]:
    """The model input's (D, H, W) size before any crop: the grid, resampled if asked."""
    if cfg.target_spacing is None:
        return grid.shape
    d, h, w = (
        max(1, math.floor(n * s / t + 0.5))
        for n, s, t in zip(grid.shape, grid.spacing, cfg.target_spacing, strict=True)
    )
    return d, h, w


def select_regions(regions: Regions, labels: LabelMap) -> tuple[tuple[str, np.ndarray], ...]:
    """The masks of ``labels``' regions, in order, on the mask's stored grid.

    A label map's values are taken from ``labels``; a missing or empty region
    is a :class:`RegionError`, labels of the wrong kind an :class:`InputError`.
    """
    check_label_kind(regions.path, labels, by_name=not isinstance(regions, LabelRegions))
    if isinstance(regions, LabelRegions):
        regions = LabelRegions(regions.labels, labels, regions.affine, regions.path)
    return regions.select([name for name, _ in labels])


def check_pair(
    pair: VolumePair, labels: LabelMap, cfg: PreprocessConfig, reach: Reach | None = None
) -> VolumePair:
    """Image and mask share a grid (or the mask may be resampled onto the image's and
    every region lies inside the image), the image is finite, every named region is
    present, and the model input is large enough for ``reach``. Returns the pair
    aligned (:func:`align_pair`)."""
    pair = align_pair(pair, cfg.affine_tolerance_mm)
    image_grid = dhw_grid(pair.image.shape, pair.image.affine)
    mask_grid = dhw_grid(pair.regions.shape, pair.regions.affine)
    resample = not same_grid(image_grid, mask_grid, cfg.affine_tolerance_mm)
    if resample and cfg.mask_resample == "off":
        raise GeometryError(_grid_message(pair, image_grid, mask_grid, cfg))
    data = pair.image.data  # integers are finite: only a float image is looked at
    not_finite = (
        0 if data.dtype.kind in "iu" else int(data.size - np.count_nonzero(np.isfinite(data)))
    )
    if not_finite:
        raise InputError(
            f"image file {pair.image_path} has {not_finite:,} NaN or infinite voxels; "
            "replace them (e.g. with -1000 HU) before the analysis"
        )
    selected = select_regions(pair.regions, labels)
    if resample:
        for name, mask in selected:
            dhw, _ = to_dhw(mask, pair.regions.affine)
            outside = count_outside(dhw, mask_grid.affine, image_grid.shape, image_grid.affine)
            if outside:
                raise RegionError(
                    f"region {name!r} of {pair.mask_path} has {outside:,} of "
                    f"{int(np.count_nonzero(mask)):,} voxels outside the image "
                    f"{pair.image_path} (mask grid {fmt_shape(mask_grid.shape)}, image grid "
                    f"{fmt_shape(image_grid.shape)}, D x H x W in RAS+), so --mask-resample "
                    "nearest would cut it; give an image that covers the region, or leave the "
                    "region out of the labels"
                )
    if reach is not None:
        spacing = cfg.target_spacing or image_grid.spacing
        check_size(model_shape(image_grid, cfg), spacing, reach, pair.image_path)
    return pair


def _grid_message(pair: VolumePair, image: Grid, mask: Grid, cfg: PreprocessConfig) -> str:
    codes = (
        "".join(nib.aff2axcodes(pair.image.affine)),
        "".join(nib.aff2axcodes(pair.regions.affine)),
    )
    fix = (
        "resample the mask onto the image grid, e.g. with --mask-resample nearest (each "
        "region by nearest neighbour in world coordinates), or fix the manifest"
    )
    if image.shape != mask.shape:
        return (
            f"mask grid {fmt_shape(mask.shape)} ({pair.mask_path}) does not match image grid "
            f"{fmt_shape(image.shape)} ({pair.image_path}), both D x H x W after reorienting "
            f"to RAS+ (mask stored {codes[1]}, image stored {codes[0]}); {fix}"
        )
    return (
        f"mask grid of {pair.mask_path} is not the image grid of {pair.image_path}: its "
        f"corner voxels lie up to {_difference(image, mask):.6g} mm from the image's after "
        f"both are reoriented to RAS+ (mask "
        f"stored {codes[1]}, image stored {codes[0]}; tolerance {cfg.affine_tolerance_mm:g} mm); "
        f"image affine {fmt_affine(image.affine)}, mask affine {fmt_affine(mask.affine)} "
        f"(D, H, W columns); {fix}"
    )


def check_size(
    shape: tuple[int, int, int],
    spacing: tuple[float, ...],
    reach: Reach,
    image: Path,
    *,
    cropped: bool = False,
) -> None:
    """The model input ``shape`` (D, H, W, at ``spacing`` mm) leaves every hooked layer
    at least one cell; else a :class:`GeometryError` naming the minimum and the fixes."""
    need = tuple(max([1, *(r.min_shape[a] for r in reach.layers)]) for a in range(3))
    short = [a for a in range(3) if shape[a] < need[a]]
    if not short:
        return
    layers = [r for r in reach.layers if any(r.min_shape[a] > shape[a] for a in short)]
    deepest = max(layers, key=lambda r: sum(r.min_shape))
    finer = [f"{s:.4g}" for s in spacing]
    for a in short:  # floor(n * s / t + 0.5) >= need  <=>  t <= n * s / (need - 0.5)
        finer[a] = f"{math.floor(shape[a] * spacing[a] / (need[a] - 0.5) * 1000) / 1000:g}"
    along = " and ".join(
        f"{need[a]} voxels along {_AXIS_WORDS[a]} ({shape[a]} here, {shape[a] * spacing[a]:.4g} mm)"
        for a in short
    )
    reached = [s for s in reach.stages if all(s.min_shape[b] <= shape[b] for b in range(3))]
    shallower = "hook a shallower layer"
    if reached:
        stage = reached[-1]
        shallower += (
            f": this input reaches {stage.layer} (from {fmt_shape(stage.min_shape)} voxels), "
            f"e.g. --layers {stage.layer}"
        )
    plural = len(layers) > 1
    raise GeometryError(
        f"image {image} gives a model input of {fmt_shape(shape)} voxels (D x H x W) "
        f"{'after cropping to the labels (--crop-margin) ' if cropped else ''}at "
        f"{'x'.join(f'{s:.4g}' for s in spacing)} mm, too small for hooked "
        f"layer{'s' if plural else ''} {', '.join(r.layer for r in layers)} "
        f"({deepest.module_path}): {'they need' if plural else 'it needs'} at least {along}, "
        "or the network's strides leave no cell; fixes: "
        f"{'a larger --crop-margin, ' if cropped else ''}resample finer along "
        f"{' and '.join(AXES[a] for a in short)} with --spacing (e.g. --spacing "
        f"{','.join(finer)}), or {shallower}"
    )
