"""Region pooling: hooked feature maps and region masks in, one vector per region.

Three protocols (``PoolingConfig.mode``):

``masked-pool``
    One forward pass per subject. Each region's mask is averaged down to the
    layer's grid, so a cell's weight is the fraction of its voxels inside the
    region, and the region vector is the weighted mean of the feature map.
``masked-gem``
    As ``masked-pool`` with a generalised mean of exponent p,
    ``(sum_c w_c max(f_c, eps)^p / sum_c w_c)^(1/p)``; p = 1 is the weighted
    mean of the clamped map and large p approaches the region's maximum.
    Hooked convolutions are taken before ReLU, so values below eps are clamped
    (as GeM always does).
``masked-input``
    The origin study's protocol: one forward pass per region with every voxel
    outside the region set to air (the HU window's low end), then a global
    average over the whole feature map.

Vectors are float32; sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cohort.config import PoolingConfig
from cohort.errors import RegionError
from cohort.model.hooks import FeatureExtractor, Grid

GEM_EPS = 1e-6


_SLAB_VOXELS = 1 << 22  # region_weights reads the index in slabs of at most this many voxels


def region_weights(region_index: torch.Tensor, n_regions: int, grid: Grid) -> torch.Tensor:
    """Fraction of each grid cell's voxels in each region: (R, d, h, w) float32.

    ``region_index`` is (D, H, W) with value r for region r (other values
    belong to no region). The volume is split into cells as adaptive average
    pooling splits it, which for sizes divisible by the grid is exact blocks.

    The same numbers as ``adaptive_avg_pool3d`` of the regions' one-hot masks,
    without the (R, D, H, W) masks: per depth cell, each region's voxels are
    counted slab by slab along depth (exact: whole numbers in float32), then the
    counts are averaged over the cells in the plane and divided by the cell's depth.
    """
    if region_index.dim() != 3:
        raise RegionError(f"region index must be (D, H, W), got shape {tuple(region_index.shape)}")
    depth, height, width = region_index.shape
    gd, gh, gw = grid
    out = torch.empty((n_regions, gd, gh, gw), dtype=torch.float32, device=region_index.device)
    step = max(1, _SLAB_VOXELS // (height * width))
    for i in range(gd):
        d0, d1 = (i * depth) // gd, -(-(i + 1) * depth // gd)  # adaptive pooling's cell
        counts = region_index.new_zeros((n_regions, height, width), dtype=torch.float32)
        for s0 in range(d0, d1, step):
            slab = region_index[s0 : min(d1, s0 + step)]
            for r in range(n_regions):
                counts[r] += (slab == r).sum(dim=0, dtype=torch.float32)
        out[:, i] = F.adaptive_avg_pool2d(counts, (gh, gw)) / (d1 - d0)
    return out


def check_coverage(
    weights: torch.Tensor, names: Sequence[str], layer: str, min_coverage: float
) -> None:
    """Each region must carry at least ``min_coverage`` cells of weight (and more than 0)."""
    coverage = weights.double().sum(dim=(1, 2, 3)).tolist()
    grid = "x".join(str(n) for n in weights.shape[1:])
    for name, cells in zip(names, coverage, strict=True):
        if cells <= 0 or cells < min_coverage:
            raise RegionError(
                f"region {name!r} covers {cells:.4g} cells of layer {layer}'s {grid} grid "
                f"(needs at least {min_coverage:g} and more than 0); it is too small for this "
                "layer: hook a shallower layer, crop less, resample finer, or lower min coverage"
            )


def masked_mean(fmap: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of a (C, d, h, w) map under (R, d, h, w) weights: (R, C) float32."""
    _check_grids(fmap, weights)
    w = weights.double()
    total = torch.einsum("rdhw,cdhw->rc", w, fmap.double())
    return (total / w.sum(dim=(1, 2, 3)).unsqueeze(1)).float()


def masked_gem(fmap: torch.Tensor, weights: torch.Tensor, p: float) -> torch.Tensor:
    """Weighted generalised mean of exponent ``p``: (R, C) float32."""
    _check_grids(fmap, weights)
    w = weights.double()
    powered = fmap.double().clamp(min=GEM_EPS).pow(p)
    mean = torch.einsum("rdhw,cdhw->rc", w, powered) / w.sum(dim=(1, 2, 3)).unsqueeze(1)
    return mean.pow(1.0 / p).float()


def global_mean(fmap: torch.Tensor) -> torch.Tensor:
    """Global average pooling of (N, C, d, h, w) maps: (N, C) float32."""
    return fmap.double().mean(dim=(2, 3, 4)).float()


def _check_grids(fmap: torch.Tensor, weights: torch.Tensor) -> None:
    if fmap.dim() != 4 or weights.dim() != 4 or fmap.shape[1:] != weights.shape[1:]:
        raise RegionError(
            f"feature map (C, d, h, w) {tuple(fmap.shape)} and weights (R, d, h, w) "
            f"{tuple(weights.shape)} must share one grid"
        )


def air_outside(
    image: torch.Tensor, region_index: torch.Tensor, region: int, air: float
) -> torch.Tensor:
    """The model input with every voxel outside region ``region`` set to ``air``.

    ``region_index`` is (D, H, W), or (P, D, H, W) planes when regions overlap
    (:mod:`cohort.inputs.regions`).
    """
    inside = region_index == region
    if region_index.dim() == image.dim() + 1:
        inside = inside.any(dim=0)
    return torch.where(inside, image, torch.full_like(image, air))


def plane_weights(planes: torch.Tensor, n_regions: int, grid: Grid) -> torch.Tensor:
    """:func:`region_weights` of (P, D, H, W) index planes: (R, d, h, w) float32.

    Each region lives in one plane, so the other planes add exact zeros to its
    weights; one plane (disjoint regions) is :func:`region_weights` itself.
    """
    weights = region_weights(planes[0], n_regions, grid)
    for plane in planes[1:]:
        weights += region_weights(plane, n_regions, grid)
    return weights


@dataclass(frozen=True)
class RegionVector:
    """One pooled vector: a region at a hooked layer."""

    region: str
    layer: str  # stable id, e.g. "conv-1"
    layer_name: str  # module path
    vector: np.ndarray  # float32, length = channels


def extract(
    extractor: FeatureExtractor,
    image: torch.Tensor,
    region_index: torch.Tensor,
    region_names: Sequence[str],
    cfg: PoolingConfig,
    air: float,
) -> list[RegionVector]:
    """Pool one subject's hooked features for every region and layer.

    ``image`` is the (D, H, W) normalised model input and ``region_index`` the
    (D, H, W) region index, or its (P, D, H, W) planes when regions overlap
    (:mod:`cohort.inputs.regions`: each region is value r in one plane), both
    already on the extractor's device. Each region is pooled on its own
    voxels. Output is ordered region-major, then layers in the extractor's order.
    """
    planes = region_index.unsqueeze(0) if region_index.dim() == 3 else region_index
    if image.dim() != 3 or planes.dim() != 4 or planes.shape[1:] != image.shape:
        raise RegionError(
            f"image {tuple(image.shape)} and region index {tuple(region_index.shape)} "
            "must be the same (D, H, W) grid (the index may hold (P, D, H, W) planes)"
        )
    n = len(region_names)
    pooled: dict[str, torch.Tensor] = {}  # layer -> (R, C)
    with torch.inference_mode():
        if cfg.mode == "masked-input":
            per_region: list[dict[str, torch.Tensor]] = []
            for r in range(n):
                x = air_outside(image, region_index, r, air)[None, None]
                maps = extractor(x)
                per_region.append({layer: global_mean(fmap)[0] for layer, fmap in maps.items()})
            for info in extractor.layers:
                pooled[info.layer] = torch.stack([vectors[info.layer] for vectors in per_region])
        else:
            maps = extractor(image[None, None])
            by_grid: dict[Grid, torch.Tensor] = {}  # layers on one grid share their weights
            for info in extractor.layers:
                fmap = maps[info.layer][0]
                grid = (fmap.shape[1], fmap.shape[2], fmap.shape[3])
                if n > 1 and math.prod(grid) == 1:
                    raise RegionError(
                        f"layer {info.layer} ({info.module_path}) has a 1x1x1 grid for this "
                        f"{'x'.join(map(str, image.shape))} input, so every region would get "
                        "the same vector (cosine exactly 1); give a larger volume (less "
                        "cropping, finer --spacing) or hook a shallower layer"
                    )
                weights = by_grid.get(grid)
                if weights is None:
                    weights = by_grid[grid] = plane_weights(planes, n, grid)
                check_coverage(weights, region_names, info.layer, cfg.min_coverage)
                if cfg.mode == "masked-gem":
                    pooled[info.layer] = masked_gem(fmap, weights, cfg.gem_p)
                else:
                    pooled[info.layer] = masked_mean(fmap, weights)
    out: list[RegionVector] = []
    for r, name in enumerate(region_names):
        for info in extractor.layers:
            vector = pooled[info.layer][r].cpu().numpy().astype(np.float32)
            out.append(RegionVector(name, info.layer, info.module_path, vector))
    return out
