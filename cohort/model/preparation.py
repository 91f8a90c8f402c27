"""How the feature actor prepares its input on the device, in numbers (no torch).

:mod:`cohort.model.intensity` resamples (``--spacing``) one axis at a time in
the order :func:`resample_order` gives, each pass in pieces of at most
:data:`RESAMPLE_VOXELS` output voxels (:func:`piece_axis`, :func:`piece_length`),
and sums the foreground's statistics (``--normalise foreground``) in slabs of
:data:`STATS_VOXELS`. Both read their sizes from here, and
:func:`prepare_bytes` counts what they allocate, for the memory estimate
(:mod:`cohort.model.memory`): exact arithmetic of the code's allocations,
checked against the torch profiler in ``tests/test_memory_estimate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "IMAGE_BPV",
    "RESAMPLE_VOXELS",
    "STATS_BPV",
    "STATS_VOXELS",
    "piece_axis",
    "piece_length",
    "prepare_bytes",
    "resample_order",
]

IMAGE_BPV = 4  # the float32 model input the actor makes of the hand-over
RESAMPLE_VOXELS = 1 << 21  # output voxels of one piece of a resampling pass
STATS_VOXELS = 1 << 21  # voxels of one slab of the foreground's statistics
STATS_BPV = 17  # per voxel of such a slab: its mask and two float64 copies

Shape = tuple[int, int, int]


def resample_order(window: Shape, shape: Shape) -> list[int]:
    """The axes in the order the device resampling takes them
    (:func:`cohort.model.intensity.resample_hu`): the one that shrinks most from
    ``window`` (the handed-over grid) to ``shape`` (the model's) first, ties last axis
    first, so that the float64 arrays of each pass are as small as they can be."""
    shrink = [shape[a] / max(window[a], 1) for a in range(3)]
    return sorted(range(3), key=lambda a: (shrink[a], -a))


def piece_axis(axis: int) -> int:
    """The axis a resampling pass along ``axis`` is cut into pieces along."""
    return 1 if axis == 0 else 0


def piece_length(size: Sequence[int], along: int) -> int:
    """Slices along ``along`` of one piece of a pass whose output is ``size``: as many
    as :data:`RESAMPLE_VOXELS` output voxels hold, at least one."""
    plane = math.prod(size) // max(size[along], 1)
    return max(1, RESAMPLE_VOXELS // max(plane, 1))


def prepare_bytes(
    shape: Shape, window: Shape | None, hu_bytes: int, foreground: bool
) -> tuple[float, str]:
    """Peak bytes of the actor's preparation of its input, beyond the hand-over, and
    its phase: without ``window`` the float32 copy the window and normalisation work
    in (:func:`cohort.model.intensity.normalise_hu`), plus the foreground statistics'
    slab; with it (``--spacing``, the window of the stored image handed over) each
    resampling pass (:func:`cohort.model.intensity.resample_hu`) holds its input (the
    hand-over itself first), its output (float64; the last one float32) and one
    piece's gathered values (as stored, then as float64, and the other end's
    float64); normalisation then copies the resampled image once more (which covers
    the flip's copy). Measured with the torch profiler: ``tests/test_memory_estimate.py``."""
    m = math.prod(shape)
    stats = STATS_BPV * min(m, STATS_VOXELS) if foreground else 0
    normalise = IMAGE_BPV * m + stats
    if window is None:
        return float(normalise), "normalisation"
    phases = [(float(IMAGE_BPV * m + normalise), "normalisation")]
    order = resample_order(window, shape)
    sizes, before = list(window), 0
    for step, axis in enumerate(order):
        sizes[axis] = shape[axis]
        after = math.prod(sizes)
        along = piece_axis(axis)
        piece = min(sizes[along], piece_length(sizes, along)) * (after // max(sizes[along], 1))
        out = (IMAGE_BPV if step == len(order) - 1 else 8) * after
        gathered = (16 + hu_bytes) * piece if step == 0 else 16 * piece
        phases.append((float(before + out + gathered), "resampling"))
        before = 8 * after
    return max(phases)
