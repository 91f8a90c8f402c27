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
"""

from __future__ import annotations

import torch

from cohort.config import PreprocessConfig
from cohort.errors import InputError

__all__ = ["normalise_hu"]


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
