"""A mask on another grid, put on the image grid by nearest neighbour in world coordinates.

Both grids are in the RAS+ (D, H, W) frame (:func:`cohort.inputs.geometry.dhw_grid`),
each with its voxel -> world mm affine. Image voxel ``v`` takes the mask
voxel nearest to its centre: index ``floor(M @ v + 0.5)`` with ``M`` the
image -> mask index map ``inv(mask affine) @ image affine``; an image voxel
whose centre lies outside the mask grid gets no region. When ``M`` maps each
axis to itself (both grids axis-aligned in the same frame: different extent,
origin or spacing) the indices are worked out per axis; otherwise slice by
slice.
"""

from __future__ import annotations

import numpy as np

__all__ = ["count_outside", "nearest_onto"]

_ALIGNED = 1e-9  # off-diagonal terms of M below this (relative) count as zero
_EDGE = 1e-6  # a mask voxel centre this far beyond the image's outer face still counts inside


def _index_map(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """``inv(target) @ source``: a voxel of the source grid -> continuous target index."""
    return np.linalg.inv(target_affine) @ source_affine


def _aligned(m: np.ndarray) -> bool:
    block = m[:3, :3]
    off = block - np.diag(np.diag(block))
    return bool(np.max(np.abs(off)) <= _ALIGNED * max(1.0, float(np.max(np.abs(block)))))


def nearest_onto(
    data: np.ndarray,
    data_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    fill: int,
) -> np.ndarray:
    """``data`` (a (D, H, W) array on its grid) sampled at every voxel centre of the grid
    ``(shape, affine)`` by nearest neighbour; voxels outside ``data``'s grid get ``fill``."""
    m = _index_map(affine, data_affine)
    out = np.full(shape, fill, dtype=data.dtype)
    if _aligned(m):
        axes = [
            np.floor(m[a, a] * np.arange(shape[a]) + m[a, 3] + 0.5).astype(np.intp)
            for a in range(3)
        ]
        within = [(i >= 0) & (i < data.shape[a]) for a, i in enumerate(axes)]
        if all(v.any() for v in within):
            out[np.ix_(*within)] = data[np.ix_(*(i[v] for i, v in zip(axes, within, strict=True)))]
        return out
    h, w = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    plane = np.stack([np.zeros_like(h), h, w, np.ones_like(h)]).reshape(4, -1).astype(np.float64)
    for d in range(shape[0]):
        plane[0] = d
        index = np.floor(m[:3] @ plane + 0.5).astype(np.intp)
        inside = np.all((index >= 0) & (index < np.array(data.shape)[:, None]), axis=0)
        out[d].reshape(-1)[inside] = data[index[0, inside], index[1, inside], index[2, inside]]
    return out


def count_outside(
    mask: np.ndarray, mask_affine: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray
) -> int:
    """How many voxels of a (D, H, W) bool ``mask`` have their centre outside the grid
    ``(shape, affine)`` (beyond the outer faces of its edge voxels)."""
    m = _index_map(mask_affine, affine)
    limits = np.array(shape, dtype=np.float64)[:, None]
    if _aligned(m):
        inside = []
        for a in range(3):
            position = m[a, a] * np.arange(mask.shape[a]) + m[a, 3]
            inside.append((position >= -0.5 - _EDGE) & (position <= shape[a] - 0.5 + _EDGE))
        return int(np.count_nonzero(mask) - np.count_nonzero(mask[np.ix_(*inside)]))
    outside = 0
    for d in range(mask.shape[0]):
        h, w = np.nonzero(mask[d])
        if not h.size:
            continue
        points = np.stack([np.full_like(h, d), h, w, np.ones_like(h)]).astype(np.float64)
        position = m[:3] @ points
        inside = np.all((position >= -0.5 - _EDGE) & (position <= limits - 0.5 + _EDGE), axis=0)
        outside += int(np.count_nonzero(~inside))
    return outside
