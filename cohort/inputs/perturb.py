"""Perturbations of one volume and its region masks, as a rescan or a second reader
would change them: pure numpy/scipy on stored arrays and their voxel -> RAS affines.

Each function takes arrays and plain numbers (and a seeded generator where it
draws) and returns new arrays; :mod:`cohort.inputs.chain` draws the numbers and
chains the components for ``cohort robustness``.

==========================  ===================================================
:func:`noise_level`         the image's own noise SD: a robust wavelet estimate
:func:`add_noise`           Gaussian noise of a given SD
:func:`rigid`               a world transform: rotation about a centre, then a shift
:func:`move_image`          the image under a world transform (trilinear)
:func:`move_masks`          regions under the same transform (trilinear, >= 0.5)
:func:`change_volume`       a region grown or shrunk to an exact voxel count
:func:`randomise_contour`   a region's boundary redrawn, volume kept to the voxel
==========================  ===================================================

Image and masks move together because both are resampled through the same
world transform, each on its own grid (a mask on another grid stays on it).

References
----------
Donoho DL, Johnstone IM. Ideal spatial adaptation by wavelet shrinkage.
Biometrika 1994; 81(3): 425-455. (The noise estimate: the median absolute
finest-scale wavelet coefficient divided by 0.6745.)

Zwanenburg A, Leger S, Agolli L, et al. Assessing robustness of radiomic
features by image perturbation. Scientific Reports 2019; 9: 614.
doi:10.1038/s41598-018-36938-4
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cohort.errors import ConfigError, RegionError

__all__ = [
    "MAD_TO_SD",
    "add_noise",
    "affine_spacing",
    "centroid_mm",
    "change_volume",
    "move_image",
    "move_masks",
    "noise_level",
    "randomise_contour",
    "rigid",
    "rotation_matrix",
    "signed_distance",
]

MAD_TO_SD = 0.6744897501960817  # the median of |N(0, 1)|: MAD / this = SD for Gaussian noise
BoolArray = npt.NDArray[np.bool_]


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the stored axes: the column norms of the affine."""
    i, j, k = (float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return i, j, k


# ------------------------------------------------------------------------- noise


def noise_level(image: np.ndarray) -> float:
    """The image's noise SD, from the finest diagonal detail of a 3D Haar wavelet.

    Each 2x2x2 block gives ``d = sum(+-x) / sqrt(8)`` (signs alternating along
    every axis), whose SD is the noise SD for independent noise while smooth
    anatomy cancels; the estimate is ``median(|d|) / 0.6745`` (Donoho &
    Johnstone 1994), over the blocks that are not constant, so padding outside
    the field of view (one value) does not pull it to 0. Edges touch few blocks
    and barely move the median. Returns 0.0 when every block is constant.
    """
    x = np.asarray(image, dtype=np.float64)
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
    if x.size == 0:
        return 0.0
    blocks = [x[a::2, b::2, c::2] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    signs = [(-1) ** (a + b + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    detail = sum(s * blk for s, blk in zip(signs, blocks, strict=True)) / math.sqrt(8.0)
    stacked = np.stack(blocks)
    varying = stacked.max(axis=0) > stacked.min(axis=0)
    if not varying.any():
        return 0.0
    return float(np.median(np.abs(np.asarray(detail)[varying])) / MAD_TO_SD)


def add_noise(image: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` plus independent Gaussian noise of SD ``sd`` (float32)."""
    if sd < 0 or not math.isfinite(sd):
        raise ConfigError(f"noise SD must be a finite number >= 0, got {sd}")
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sd)
    return np.asarray(image, dtype=np.float32) + noise


# -------------------------------------------------------------------- geometry


def rotation_matrix(axis: npt.ArrayLike, degrees: float) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about the unit vector ``axis`` (right-handed)."""
    u = np.asarray(axis, dtype=np.float64)
    norm = float(np.linalg.norm(u))
    if norm == 0:
        raise ConfigError("a rotation axis must be a non-zero vector")
    x, y, z = u / norm
    theta = math.radians(degrees)
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(theta) * cross + (1.0 - math.cos(theta)) * cross @ cross


def rigid(rotation: np.ndarray, centre_mm: npt.ArrayLike, shift_mm: npt.ArrayLike) -> np.ndarray:
    """The 4x4 world transform p -> R (p - c) + c + t: rotate about ``centre_mm``, then shift."""
    centre = np.asarray(centre_mm, dtype=np.float64)
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = centre - rotation @ centre + np.asarray(shift_mm, dtype=np.float64)
    return transform


def centroid_mm(masks: Sequence[np.ndarray], affine: np.ndarray) -> np.ndarray:
    """The world (RAS mm) centroid of the union of ``masks`` on the grid of ``affine``."""
    union = np.any(np.stack([np.asarray(m, dtype=bool) for m in masks]), axis=0)
    index = np.argwhere(union).mean(axis=0)
    return np.asarray(affine)[:3, :3] @ index + np.asarray(affine)[:3, 3]


def _voxel_map(affine: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """For output voxel v, the input voxel it samples: A^-1 T^-1 A v (4x4)."""
    a = np.asarray(affine, dtype=np.float64)
    return np.linalg.inv(a) @ np.linalg.inv(transform) @ a


def move_image(image: np.ndarray, affine: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """The image whose content at world point p moved to ``transform @ p`` (trilinear,
    the grid kept; voxels that come from outside take the nearest edge value)."""
    from scipy import ndimage

    m = _voxel_map(affine, transform)
    out = ndimage.affine_transform(
        np.asarray(image, dtype=np.float32), m[:3, :3], offset=m[:3, 3], order=1, mode="nearest"
    )
    return np.asarray(out, dtype=np.float32)


def move_masks(
    masks: Sequence[np.ndarray], affine: np.ndarray, transform: np.ndarray, disjoint: bool
) -> list[BoolArray]:
    """Region masks under ``transform``: each indicator resampled trilinearly on its grid.

    ``disjoint`` (a label map): each voxel goes to the region whose resampled
    indicator is largest, or to none when "no region" (1 minus their sum) is, so
    the regions stay disjoint; otherwise each mask is its own indicator >= 0.5.
    Nothing comes in from outside the grid.
    """
    from scipy import ndimage

    m = _voxel_map(affine, transform)
    moved = np.stack(
        [
            ndimage.affine_transform(
                np.asarray(mask, dtype=np.float32), m[:3, :3], offset=m[:3, 3], order=1, cval=0.0
            )
            for mask in masks
        ]
    )
    if not disjoint:
        return [plane >= 0.5 for plane in moved]
    none = 1.0 - moved.sum(axis=0)
    winner = np.argmax(np.concatenate([none[np.newaxis], moved]), axis=0)
    return [winner == r + 1 for r in range(len(masks))]


# ---------------------------------------------------------------- region shape


def signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance in mm to the region's boundary: inside ``-`` (to the nearest voxel
    outside), outside ``+`` (to the nearest voxel inside); float64."""
    from scipy import ndimage

    region = np.asarray(mask, dtype=bool)
    inside = ndimage.distance_transform_edt(region, sampling=spacing)
    outside = ndimage.distance_transform_edt(~region, sampling=spacing)
    return np.where(region, -inside, outside)


def _box(region: BoolArray, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of ``region`` plus ``margin`` voxels per side, clipped."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(region.any(axis=others))
        lo, hi = int(hits[0]) - margin, int(hits[-1]) + margin + 1
        box.append(slice(max(0, lo), min(region.shape[axis], hi)))
    return box[0], box[1], box[2]


def _blocked(region: BoolArray, blocked: np.ndarray | None) -> BoolArray:
    """The voxels ``region`` may not take (never its own)."""
    if blocked is None:
        return np.zeros_like(region)
    return np.asarray(blocked, dtype=bool) & ~region


def _lowest(score: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the ``count`` lowest scores, ties in a seeded random order."""
    flat = score.ravel()
    order = np.lexsort((rng.permutation(flat.size), flat))
    return order[:count]


def change_volume(
    mask: np.ndarray,
    spacing: Sequence[float],
    fraction: float,
    rng: np.random.Generator,
    blocked: np.ndarray | None = None,
) -> BoolArray:
    """The region grown (``fraction > 0``) or shrunk to exactly
    ``round(voxels * (1 + fraction))`` voxels by a threshold on its signed distance
    map: the voxels nearest the inside, ties broken in a seeded random order.

    ``blocked`` voxels (other regions of a label map) are never added. The
    distance map is computed in a box around the region; the box grows until
    every added voxel is nearer than its edge, so the result equals the
    whole-volume one. May return an empty region (the caller decides).
    """
    region = np.asarray(mask, dtype=bool)
    count = int(np.count_nonzero(region))
    target = max(0, math.floor(count * (1.0 + fraction) + 0.5))
    if count == 0 or target == count:
        return region.copy()
    blocked = _blocked(region, blocked)
    free = region.size - int(np.count_nonzero(blocked))
    if target > free:
        raise RegionError(
            f"a region of {count} voxels cannot grow by {fraction:+.0%} to {target} voxels: "
            f"only {free} voxels of the grid are free (other regions block the rest)"
        )
    margin = 2
    while True:
        box = _box(region, margin)
        inner, barrier = region[box], blocked[box]
        distance = signed_distance(inner, spacing)
        distance[barrier] = np.inf
        chosen = _lowest(distance, target, rng)
        reach = float(distance.ravel()[chosen].max()) if target else -np.inf
        whole = all(b.start == 0 and b.stop == n for b, n in zip(box, region.shape, strict=True))
        if whole or (reach < margin * min(spacing) and target <= np.count_nonzero(~barrier)):
            break
        margin *= 2
    out = np.zeros_like(region)
    inner_out = np.zeros(inner.size, dtype=bool)
    inner_out[chosen] = True
    out[box] = inner_out.reshape(inner.shape)
    return out


def randomise_contour(
    mask: np.ndarray,
    spacing: Sequence[float],
    band_mm: float,
    rng: np.random.Generator,
    blocked: np.ndarray | None = None,
) -> BoolArray:
    """The region's boundary redrawn within ``band_mm`` of it, with the same voxel count.

    A Gaussian random field (white noise smoothed with an SD of ``band_mm``,
    scaled to unit SD) is added, times ``band_mm``, to the signed distance map;
    of the voxels within ``band_mm`` of the boundary (not ``blocked``), the
    region keeps as many as it had there, those of lowest score. Voxels farther
    than ``band_mm`` from the boundary never change, and the volume is exact.
    """
    from scipy import ndimage

    if band_mm <= 0:
        raise ConfigError(f"the contour band must be > 0 mm, got {band_mm}")
    region = np.asarray(mask, dtype=bool)
    if not region.any():
        return region.copy()
    blocked = _blocked(region, blocked)
    margin = math.ceil(band_mm / min(spacing)) + 2
    box = _box(region, margin)
    inner = region[box]
    distance = signed_distance(inner, spacing)
    band = (np.abs(distance) <= band_mm) & ~blocked[box]
    sigma = [band_mm / s for s in spacing]
    field = ndimage.gaussian_filter(rng.standard_normal(inner.shape), sigma, mode="reflect")
    field /= max(float(field.std()), 1e-12)
    score = np.where(band, distance + band_mm * field, np.inf)
    keep = int(np.count_nonzero(inner & band))
    chosen = _lowest(score, keep, rng)
    redrawn = inner & ~band
    flat = redrawn.ravel()
    flat[chosen] = True
    out = region.copy()
    out[box] = flat.reshape(inner.shape)
    return out
