"""The HU window and normalisation on the network's device (torch), in float32.

The same arithmetic as :func:`cohort.inputs.preprocess.normalise_intensity`
(numpy, the reference), step for step in float32: clip to [hu_min, hu_max],
subtract hu_min, divide by the window's width, then ``fixed``: subtract the
mean and divide by the standard deviation, or ``foreground``: the same with
the float64 mean and population standard deviation of the scaled voxels above
``foreground_hu``. Every constant is a float32 tensor on the device, so that
each step is an IEEE float32 operation as numpy's is (a Python scalar divisor
would let CUDA multiply by its reciprocal instead). The feature actor runs it on
the HU the loader handed over (:mod:`cohort.inputs.handover`), on the GPU when
there is one, else on the CPU.

With ``--spacing`` the loader hands over the stored image's window on its own
grid (:class:`cohort.inputs.preprocess.Deferred`); :func:`resample_hu` resamples
it here first: the trilinear interpolation of
:func:`cohort.inputs.preprocess.resample_image` (``scipy.ndimage``), with its
points and weights (:func:`cohort.inputs.preprocess.sample_points`, computed on
the host in float64) and the interpolation in float64 on the device, one axis at
a time, rounded once to float32 (bit for bit scipy's on the CPU:
``tests/test_resample_device.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cohort.config import PreprocessConfig
from cohort.errors import InputError
from cohort.inputs.preprocess import Deferred, sample_points
from cohort.model import preparation
from cohort.model.preparation import piece_axis, piece_length, resample_order

__all__ = ["normalise_hu", "resample_hu"]


def resample_hu(hu: torch.Tensor, deferred: Deferred) -> torch.Tensor:
    """The handed-over window ``hu`` resampled onto the model grid (float32, axes
    flipped as ``deferred`` says), on ``hu``'s device.

    The axis that shrinks most goes first (:func:`cohort.model.preparation.resample_order`);
    each pass writes its output (float64; the last one float32, rounded once) piece by
    piece of :data:`~cohort.model.preparation.RESAMPLE_VOXELS` output voxels, so that
    beyond its input and output a pass holds only one piece's gathered values, as the
    memory estimate counts them (:func:`cohort.model.preparation.prepare_bytes`)."""
    x = hu
    depth, height, width = (int(n) for n in hu.shape)
    order = resample_order((depth, height, width), deferred.shape)
    for step, axis in enumerate(order):
        points = sample_points(
            deferred.ratio[axis],
            deferred.start[axis],
            deferred.shape[axis],
            deferred.origin[axis],
            deferred.extent[axis],
        )
        x = _resample_axis(x, axis, points, last=step == len(order) - 1)
    return torch.flip(x, deferred.flips) if deferred.flips else x


def _resample_axis(
    x: torch.Tensor,
    axis: int,
    points: tuple[np.ndarray, np.ndarray, np.ndarray],
    last: bool,
) -> torch.Tensor:
    """One linear pass along ``axis`` (the two voxels and the weight of the second, per
    output voxel), in float64, written into a new float64 tensor (float32 if ``last``)
    piece by piece along another axis."""
    first, second, weight = points
    size = [int(n) for n in x.shape]
    size[axis] = len(weight)
    out = torch.empty(size, dtype=torch.float32 if last else torch.float64, device=x.device)
    shape = [1, 1, 1]
    shape[axis] = len(weight)
    w = torch.from_numpy(weight).to(x.device).reshape(shape)
    below = torch.from_numpy(first).to(x.device)
    above = torch.from_numpy(second).to(x.device)
    along = piece_axis(axis)
    length = piece_length(size, along)
    for start in range(0, size[along], length):
        count = min(length, size[along] - start)
        part = x.narrow(along, start, count)
        low = part.index_select(axis, below).to(torch.float64)
        high = part.index_select(axis, above).to(torch.float64)
        out.narrow(along, start, count).copy_(low.mul_(1.0 - w).add_(high.mul_(w)))
        del low, high  # before the next piece's are made
    return out


def normalise_hu(
    hu: torch.Tensor, cfg: PreprocessConfig, origin: str = "the image"
) -> tuple[torch.Tensor, float]:
    """HU (any real or integer dtype) -> the float32 model input, and the value the
    window's low end (air) takes; on ``hu``'s device."""

    def const(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=hu.device)

    low, high = const(cfg.hu_min), const(cfg.hu_max)
    # one new float32 tensor (``hu`` is not written: it may be a read-only hand-over)
    x = hu.to(torch.float32, copy=True).clamp_(low, high)
    x.sub_(low).div_(const(cfg.hu_max - cfg.hu_min))
    if cfg.normalise == "fixed":
        mean, std = cfg.mean, cfg.std
    else:
        mean, std = _foreground_stats(x, cfg, origin)
    x.sub_(const(mean)).div_(const(std))
    return x, (0.0 - mean) / std


def _foreground_stats(x: torch.Tensor, cfg: PreprocessConfig, origin: str) -> tuple[float, float]:
    """Mean and population standard deviation (float64, two passes, as numpy's) of the
    scaled voxels above ``foreground_hu``, slab by slab of
    :data:`~cohort.model.preparation.STATS_VOXELS`: the
    foreground is never gathered (on the CPU ``x[x > t]`` needs 33 bytes per voxel, a
    full-size CT's 1.7 GB, more than the forward pass); the device is waited for twice,
    for the count after the first pass and for the squares after the second."""
    threshold = (cfg.foreground_hu - cfg.hu_min) / (cfg.hu_max - cfg.hu_min)
    above = torch.tensor(threshold, dtype=torch.float32, device=x.device)
    flat = x.reshape(-1)
    step = preparation.STATS_VOXELS
    slabs = [flat[i : i + step] for i in range(0, flat.numel(), step)]
    count = torch.zeros((), dtype=torch.int64, device=x.device)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for slab in slabs:
        inside = slab > above
        count += inside.sum()
        total += slab.to(torch.float64).mul_(inside).sum()
    n = int(count)
    mean = total / max(n, 1)
    squares = torch.zeros((), dtype=torch.float64, device=x.device)
    for slab in slabs:
        inside = slab > above
        squares += slab.to(torch.float64).sub_(mean).square_().mul_(inside).sum()
    std = math.sqrt(float(squares) / n) if n else 0.0
    if std == 0.0:
        found = "no voxel" if n == 0 else f"{n} voxels of one value"
        raise InputError(
            f"{origin} has {found} above {cfg.foreground_hu:g} HU after resampling and "
            "cropping, so the z-score of its foreground (--normalise foreground) is undefined; "
            "check that the image is in HU, or use --normalise fixed"
        )
    return float(mean), std
