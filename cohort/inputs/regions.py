"""The regions of one prepared subject: uint8 index planes, one byte per voxel per plane.

Regions from a label map are disjoint; regions from separate mask files or
Slicer segment layers may overlap. Both are held as *planes*: (D, H, W) uint8
arrays in which value ``r`` marks region ``r`` and :data:`NO_REGION` no
region. Each region lives in exactly one plane; a region goes into the first
plane it does not overlap, so disjoint regions (every label map) share one
plane, and only overlapping ones cost another byte per voxel. ``background``
(every voxel in none of the named regions) goes into plane 0.

:attr:`cohort.inputs.preprocess.Prepared.region_index` is the single plane
itself, (D, H, W), when the regions are disjoint, and the stack (P, D, H, W)
when they overlap; :func:`planes_of` reads either as (P, D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MAX_REGIONS",
    "NO_REGION",
    "as_region_index",
    "label_plane",
    "planes_of",
    "region_counts",
    "stack",
]

NO_REGION = 255  # value of voxels in no region of a plane
MAX_REGIONS = NO_REGION  # region ids 0..254
_SLAB = 1 << 22  # voxels per slab of the passes below: their index temporaries stay small
_FEW_VALUES = 4  # label_plane: up to this many values, a compare per value beats a lookup


def planes_of(region_index: np.ndarray) -> np.ndarray:
    """A region index as (P, D, H, W) planes (a view)."""
    return region_index[np.newaxis] if region_index.ndim == 3 else region_index


def as_region_index(planes: np.ndarray) -> np.ndarray:
    """(P, D, H, W) planes as a region index: the plane itself when there is one."""
    return planes[0] if planes.shape[0] == 1 else planes


def stack(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Bool masks of one shape -> (P, D, H, W) uint8 planes; region r has value r in the
    first plane where it overlaps no earlier region."""
    if not masks:
        raise ValueError("stack needs at least one mask")
    if len(masks) > MAX_REGIONS:
        raise ValueError(f"{len(masks)} regions; at most {MAX_REGIONS} are supported")
    planes: list[np.ndarray] = []
    for r, mask in enumerate(masks):
        for plane in planes:
            if not np.any(mask & (plane != NO_REGION)):
                plane[mask] = r
                break
        else:
            plane = np.full(mask.shape, NO_REGION, dtype=np.uint8)
            plane[mask] = r
            planes.append(plane)
    return np.stack(planes)


def region_counts(planes: np.ndarray, n_regions: int) -> tuple[int, ...]:
    """Voxels of each region 0..n_regions-1 in (P, D, H, W) planes (a compare and a
    count per region and plane: no index temporaries)."""
    counts = [0] * n_regions
    for plane in planes:
        for r in range(n_regions):
            counts[r] += int(np.count_nonzero(plane == r))
    return tuple(counts)


def label_plane(
    labels: np.ndarray, values: Sequence[int], rest: int
) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """One uint8 plane from a 3D integer label map in one pass, and the voxels of each
    value: voxels of ``values[r]`` take ``r``, every other voxel ``rest``
    (:data:`NO_REGION`, or the background's id).

    The regions of a label map with distinct values are disjoint, so this is
    :func:`stack` of ``labels == value`` for each value, with ``rest`` where none is
    set: for at most :data:`_FEW_VALUES` values a compare per value and slab, counted
    as it goes (3x faster than a lookup on a 512 x 512 x 216 map); for more, one
    table lookup per voxel, then a count. Returns None where that does not hold or
    costs too much: a value repeated (overlapping regions), or labels of more than
    16 bits (no small table).
    """
    kind = labels.dtype
    if kind.kind not in "iu" or kind.itemsize > 2 or len(set(values)) != len(values):
        return None
    if len(values) > MAX_REGIONS or labels.ndim != 3:
        return None
    info, unsigned = np.iinfo(kind), np.dtype(f"u{kind.itemsize}")
    held = [(r, v) for r, v in enumerate(values) if info.min <= v <= info.max]
    plane = np.empty(labels.shape, dtype=np.uint8)
    step = max(1, _SLAB // max(1, labels.shape[1] * labels.shape[2]))
    slabs = [slice(d0, d0 + step) for d0 in range(0, labels.shape[0], step)]
    if len(values) > _FEW_VALUES:
        table = np.full(1 << (8 * kind.itemsize), rest, dtype=np.uint8)
        for r, value in held:  # indexed by the value's bits read unsigned
            table[int(np.array(value, dtype=kind).view(unsigned))] = r
        for slab in slabs:
            plane[slab] = table[labels[slab].view(unsigned)]
        return plane, region_counts(plane[np.newaxis], len(values))
    counts = [0] * len(values)
    for slab in slabs:
        part, dest = labels[slab], plane[slab]
        dest.fill(rest)
        for r, value in held:
            where = part == value
            dest[where] = r
            counts[r] += int(np.count_nonzero(where))
    return plane, tuple(counts)
