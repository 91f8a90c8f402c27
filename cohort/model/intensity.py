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

import torch

from cohort.config import PreprocessConfig
from cohort.errors import InputError
from cohort.inputs.preprocess import Deferred, sample_points

__all__ = ["normalise_hu", "resample_hu"]


def resample_hu(hu: torch.Tensor, deferred: Deferred) -> torch.Tensor:
    """The handed-over window ``hu`` resampled onto the model grid (float32, axes
    flipped as ``deferred`` says), on ``hu``'s device.

    The axis that shrinks most goes first, and the stored integers are gathered
    before they become float64, so the transient memory is the window and two
    float64 arrays of the first pass's output (then of each later one's)."""
    x = hu
    shrink = [deferred.shape[a] / max(int(hu.shape[a]), 1) for a in range(3)]
    for axis in sorted(range(3), key=lambda a: (shrink[a], -a)):
        first, second, weight = sample_points(
            deferred.ratio[axis],
            deferred.start[axis],
            deferred.shape[axis],
            deferred.origin[axis],
            deferred.extent[axis],
        )
        shape = [1, 1, 1]
        shape[axis] = len(weight)
        w = torch.from_numpy(weight).to(x.device).reshape(shape)
        low = x.index_select(axis, torch.from_numpy(first).to(x.device)).to(torch.float64)
        high = x.index_select(axis, torch.from_numpy(second).to(x.device)).to(torch.float64)
        x = low.mul_(1.0 - w).add_(high.mul_(w))
        del low, high
    out = x.to(torch.float32)
    return torch.flip(out, deferred.flips) if deferred.flips else out


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
    """Mean and population standard deviation (float64) of the scaled voxels above
    ``foreground_hu``."""
    threshold = (cfg.foreground_hu - cfg.hu_min) / (cfg.hu_max - cfg.hu_min)
    foreground = x[x > torch.tensor(threshold, dtype=torch.float32, device=x.device)]
    foreground = foreground.to(torch.float64)
    count = int(foreground.numel())
    std = float(foreground.std(correction=0)) if count else 0.0
    if std == 0.0:
        found = "no voxel" if count == 0 else f"{count} voxels of one value"
        raise InputError(
            f"{origin} has {found} above {cfg.foreground_hu:g} HU after resampling and "
            "cropping, so the z-score of its foreground (--normalise foreground) is undefined; "
            "check that the image is in HU, or use --normalise fixed"
        )
    return float(foreground.mean()), std
