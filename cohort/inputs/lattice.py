"""A mask grid that lies on the image's voxel lattice, placed on it by index arithmetic.

A DICOM SEG holds frames for some slices of its image, in any order; once its
frames are a volume (by their positions), that volume lies on the image's
lattice when every one of its voxel centres is an image voxel centre: the same
spacing and axes (in any order or direction), shifted by whole voxels. Then each
voxel has exactly one image voxel, and placing the mask is an integer index map,
with nothing resampled. :func:`lattice_map` finds that map (or says there is
none); :func:`place` applies it to a bool mask.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["lattice_map", "place"]


def lattice_map(
    shape: tuple[int, ...], affine: np.ndarray, target_affine: np.ndarray, tolerance_mm: float
) -> np.ndarray | None:
    """The integer 4x4 map from voxel indices of a grid ``(shape, affine)`` to voxel
    indices of the grid of ``target_affine``, when every voxel centre of the first lies
    within ``tolerance_mm`` of a voxel centre of the second; None otherwise.

    An axis of length 1 places one plane, so only its position counts, not its
    spacing. Both affines map voxel indices to the same world frame (mm).
    """
    continuous = np.linalg.inv(target_affine) @ np.asarray(affine, dtype=np.float64)
    snapped = np.eye(4)
    used: set[int] = set()
    for axis in range(3):
        column = continuous[:3, axis]
        if shape[axis] == 1:
            continue  # filled in below with an unused axis
        target = int(np.argmax(np.abs(column)))
        step = np.zeros(3)
        step[target] = np.sign(column[target])
        if target in used or not np.allclose(np.abs(column[target]), 1.0, atol=0.01):
            return None
        used.add(target)
        snapped[:3, axis] = step
    for axis in range(3):
        if shape[axis] == 1:
            free = next(a for a in range(3) if a not in used)
            used.add(free)
            snapped[:3, axis] = np.eye(3)[free]
    snapped[:3, 3] = np.round(continuous[:3, 3])
    corners = np.array([[*c, 1.0] for c in itertools.product(*((0, n - 1) for n in shape[:3]))]).T
    error = (np.asarray(target_affine) @ snapped - np.asarray(affine)) @ corners
    if float(np.max(np.linalg.norm(error[:3], axis=0))) > tolerance_mm:
        return None
    return snapped.astype(np.int64)


def place(
    mask: np.ndarray, index_map: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, int]:
    """``mask`` (bool) moved onto a grid of ``shape`` by ``index_map`` (from
    :func:`lattice_map`); returns the placed mask and how many of its voxels fall
    outside the grid (those are left out)."""
    voxels = np.argwhere(mask)
    target = voxels @ index_map[:3, :3].T + index_map[:3, 3]
    inside = np.all((target >= 0) & (target < np.asarray(shape)), axis=1)
    out = np.zeros(shape, dtype=bool)
    kept = target[inside]
    out[kept[:, 0], kept[:, 1], kept[:, 2]] = True
    return out, int(np.count_nonzero(~inside))
