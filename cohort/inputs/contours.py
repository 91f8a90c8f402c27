"""Closed planar contours filled on a plane of voxel centres, by the even-odd rule.

The convention (tools differ, so it is stated): a voxel belongs to a region when
its centre lies inside the region's contours on its plane. Inside is decided by
the even-odd rule over every contour of the region on that plane: a centre is
inside when a ray from it crosses the contours an odd number of times, so a
contour drawn inside another is a hole, and one inside that hole an island.
A centre exactly on a contour line follows the half-open rule of scanline
filling (an edge counts for the rows from its lower end up to, not including,
its upper end; a crossing at a centre's own position counts as left of it).

Coordinates are continuous voxel indices in the plane: voxel ``(u, v)`` has its
centre at ``(u, v)`` and spans ``u - 0.5`` to ``u + 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["fill_even_odd"]


def fill_even_odd(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The voxels of a ``shape`` plane whose centres lie inside ``polygons``.

    Parameters
    ----------
    polygons
        Closed contours, each an ``(n, 2)`` array of ``(u, v)`` vertices in voxel
        index coordinates; the last vertex joins the first. Contours of fewer
        than three vertices enclose nothing.
    shape
        ``(U, V)``: the plane's size in voxels.

    Returns
    -------
    numpy.ndarray
        ``bool`` array of ``shape``: True where the centre ``(u, v)`` is inside
        under the even-odd rule.

    Each row ``v`` of centres is filled by counting, for every ``u``, the
    contour crossings at or left of it: inside when odd. Crossings are put on
    the row as toggles at ``ceil(x)`` and summed along the row.
    """
    width, height = int(shape[0]), int(shape[1])
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    starts = [np.asarray(p, dtype=np.float64) for p in polygons if len(p) >= 3]
    if starts:
        first = np.concatenate(starts)
        second = np.concatenate([np.roll(p, -1, axis=0) for p in starts])
        u0, v0, u1, v1 = first[:, 0], first[:, 1], second[:, 0], second[:, 1]
        slanted = v0 != v1
        u0, v0, u1, v1 = u0[slanted], v0[slanted], u1[slanted], v1[slanted]
        low = np.clip(np.ceil(np.minimum(v0, v1)), 0, height).astype(np.int64)
        high = np.clip(np.ceil(np.maximum(v0, v1)), 0, height).astype(np.int64)  # exclusive
        counts = np.maximum(high - low, 0)
        edge = np.repeat(np.arange(counts.size), counts)
        offsets = np.arange(edge.size) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = low[edge] + offsets
        x = u0[edge] + (rows - v0[edge]) * (u1[edge] - u0[edge]) / (v1[edge] - v0[edge])
        columns = np.clip(np.ceil(x), 0, width).astype(np.int64)
        np.add.at(toggles, (rows, columns), 1)
    inside = np.cumsum(toggles, axis=1)[:, :width] % 2 == 1
    return np.ascontiguousarray(inside.T)
