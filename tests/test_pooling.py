"""Region pooling against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cohort.config import PoolingConfig
from cohort.errors import RegionError
from cohort.execution.driver import cosine_rows
from cohort.execution.extract import autocast
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import (
    air_outside,
    check_coverage,
    extract,
    global_mean,
    masked_gem,
    masked_mean,
    plane_weights,
    region_weights,
)


def test_region_weights_are_cell_fractions() -> None:
    # 4x4x4 volume, grid 2x2x2: each cell is a 2x2x2 block of 8 voxels
    index = torch.full((4, 4, 4), 255, dtype=torch.uint8)
    index[0:2, 0:2, 0:2] = 0  # region 0 fills cell (0,0,0)
    index[2, 2, 2] = 1  # region 1: one voxel of cell (1,1,1)
    index[3, 3, 3] = 1  # and another of the same cell
    w = region_weights(index, 2, (2, 2, 2))
    assert w.shape == (2, 2, 2, 2)
    assert w[0, 0, 0, 0] == 1.0 and w[0].sum() == 1.0
    assert w[1, 1, 1, 1] == pytest.approx(2 / 8) and w[1].sum() == pytest.approx(2 / 8)


def test_masked_mean_by_hand() -> None:
    fmap = torch.zeros(2, 1, 1, 3)  # channels x (1, 1, 3) grid
    fmap[0, 0, 0] = torch.tensor([1.0, 2.0, 4.0])
    fmap[1, 0, 0] = torch.tensor([-3.0, 0.0, 3.0])
    weights = torch.tensor([[[[1.0, 1.0, 0.0]]], [[[0.0, 0.25, 0.75]]]])
    got = masked_mean(fmap, weights)
    expected = torch.tensor([[1.5, -1.5], [(0.25 * 2 + 0.75 * 4) / 1.0, (0.75 * 3) / 1.0]])
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected)


def test_masked_gem_by_hand() -> None:
    fmap = torch.tensor([[[[1.0, 2.0, -5.0]]]])  # one channel
    weights = torch.tensor([[[[1.0, 3.0, 0.0]]]])
    got = masked_gem(fmap, weights, p=2.0)
    assert got.item() == pytest.approx(((1 * 1 + 3 * 4) / 4) ** 0.5, rel=1e-6)
    # a negative cell with weight is clamped to eps, not allowed to go through the power
    only_negative = masked_gem(fmap, torch.tensor([[[[0.0, 0.0, 1.0]]]]), p=3.0)
    assert only_negative.item() == pytest.approx(1e-6, rel=1e-3)


def test_global_mean_and_air_outside() -> None:
    fmap = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)
    assert torch.equal(global_mean(fmap), torch.tensor([[3.5, 11.5]]))
    image = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    index = torch.tensor([[[0, 1], [1, 0]]])
    assert torch.equal(
        air_outside(image, index, 1, -2.0), torch.tensor([[[-2.0, 2.0], [3.0, -2.0]]])
    )


def test_region_too_small_for_grid_is_an_error() -> None:
    weights = torch.zeros(2, 2, 2, 2)
    weights[0, 0, 0, 0] = 1.0
    weights[1, 1, 1, 1] = 0.002
    with pytest.raises(
        RegionError, match=r"'femur' covers 0\.002 cells of layer conv-1's 2x2x2 grid"
    ):
        check_coverage(weights, ["tibia", "femur"], "conv-1", min_coverage=0.01)
    check_coverage(weights, ["tibia", "femur"], "conv-1", min_coverage=0.001)
    with pytest.raises(RegionError, match="'femur' covers 0 cells"):
        check_coverage(
            torch.stack([weights[0], torch.zeros(2, 2, 2)]), ["tibia", "femur"], "x", 0.0
        )


class _Halver(nn.Module):
    """A tiny 3D network with known maps: conv of ones then 2x average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
        self.pool = nn.AvgPool3d(2)
        self.last = nn.Conv3d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.last.weight.copy_(torch.eye(2).view(2, 2, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.pool(self.conv(x)))


def test_extract_masked_pool_and_masked_input_by_hand() -> None:
    net = _Halver()
    extractor = FeatureExtractor(net, resolve_layers(net, ["conv-1", "conv-2"], (4, 4, 4)))
    image = torch.arange(64, dtype=torch.float32).reshape(4, 4, 4)
    index = torch.ones(4, 4, 4, dtype=torch.uint8)
    index[:2] = 0  # region 0 = top half along D
    names = ["upper", "lower"]
    pooled = extract(extractor, image, index, names, PoolingConfig(), air=-1.0)
    by_key = {(v.region, v.layer): v.vector for v in pooled}
    # conv-2 is the first conv (full grid): mean of the image in the region, and its negative
    upper = image[:2].mean().item()
    assert np.allclose(by_key[("upper", "conv-2")], [upper, -upper])
    # conv-1 after 2x pooling: the region is exactly the cells with d = 0
    lower = image[2:].mean().item()
    assert np.allclose(by_key[("lower", "conv-1")], [lower, -lower])
    assert [v.region for v in pooled] == ["upper", "upper", "lower", "lower"]

    masked = extract(extractor, image, index, names, PoolingConfig(mode="masked-input"), air=-1.0)
    got = {(v.region, v.layer): v.vector for v in masked}
    # whole-map mean with air (-1) outside the region
    upper_input = (image[:2].sum().item() - 32) / 64
    assert np.allclose(got[("upper", "conv-1")], [upper_input, -upper_input], atol=1e-5)
    assert got[("upper", "conv-1")].dtype == np.float32


def test_single_cell_grid_is_an_error_not_a_cosine_of_one() -> None:
    net = _Halver()
    extractor = FeatureExtractor(net, resolve_layers(net, ["conv-1"], (2, 2, 2)))
    image = torch.zeros(2, 2, 2)
    index = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=torch.uint8)
    with pytest.raises(RegionError, match="1x1x1 grid for this 2x2x2 input"):
        extract(extractor, image, index, ["a", "b"], PoolingConfig(), air=-1.0)
    # masked-input pools the whole map per region, so one cell is fine there
    vectors = extract(extractor, image, index, ["a", "b"], PoolingConfig(mode="masked-input"), -1.0)
    assert len(vectors) == 2


def test_bf16_autocast_stays_close_to_fp32() -> None:
    """The --precision bf16 path (autocast, float64 pooling) against fp32 on the CPU.

    Measured here: vectors 6-7e-3 relative to the largest value, cosines within
    1.3e-3; the bounds leave twice that. The vectors must also differ, or
    autocast was not in effect and the comparison proves nothing.
    """
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    extractor = FeatureExtractor(network, resolve_layers(network, ["conv-1", "conv-5"]))
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((48, 64, 64), generator=gen)
    index = torch.zeros((48, 64, 64), dtype=torch.uint8)
    index[:, :32] = 1
    index[8:40, 40:, 16:48] = 2
    names = ("tibia", "femur", "background")
    cpu = torch.device("cpu")
    gaps = []
    for mode in ("masked-pool", "masked-input"):
        cfg = PoolingConfig(mode=mode)  # type: ignore[arg-type]
        with autocast(cpu, "fp32"):
            ref = extract(extractor, image, index, names, cfg, -1.0)
        with autocast(cpu, "bf16"):
            low = extract(extractor, image, index, names, cfg, -1.0)
        scale = max(float(np.abs(v.vector).max()) for v in ref)
        diffs = [np.abs(a.vector - b.vector).max() for a, b in zip(ref, low, strict=True)]
        rel = float(max(diffs)) / scale
        assert 0 < rel < 0.015, (mode, rel)
        for a, b in zip(cosine_rows(ref), cosine_rows(low), strict=True):
            gaps.append(abs(a["cosine"] - b["cosine"]))
        assert all(v.vector.dtype == np.float32 for v in low)
    assert max(gaps) <= 3e-3


# --------------------------------------------- overlapping regions: index planes


def overlapping_index() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Two overlapping regions on a 4x4x4 grid as planes, and their masks by hand."""
    a = np.zeros((4, 4, 4), dtype=bool)
    a[0:3, 0:2, :] = True  # 24 voxels
    b = np.zeros((4, 4, 4), dtype=bool)
    b[1:4, 1:4, 1:3] = True  # 18 voxels, 6 of them also in a
    planes = np.full((2, 4, 4, 4), 255, dtype=np.uint8)
    planes[0][a] = 0  # region 0 in plane 0, region 1 in plane 1
    planes[1][b] = 1
    return torch.from_numpy(planes), a, b


def test_plane_weights_are_each_regions_own_cell_fractions() -> None:
    planes, a, b = overlapping_index()
    weights = plane_weights(planes, 2, (2, 2, 2))
    for r, mask in enumerate((a, b)):
        by_hand = mask.reshape(2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))  # 2x2x2 blocks
        np.testing.assert_array_equal(weights[r].numpy(), by_hand.astype(np.float32))
    one = plane_weights(planes[:1], 1, (2, 2, 2))  # one plane is region_weights itself
    assert torch.equal(one, region_weights(planes[0], 1, (2, 2, 2)))


def test_overlapping_regions_each_get_the_vector_of_their_own_voxels() -> None:
    """masked-pool and masked-input on two overlapping regions, against numpy by hand."""
    net = _Halver()
    extractor = FeatureExtractor(net, resolve_layers(net, ["conv-1", "conv-2"], (4, 4, 4)))
    image = torch.arange(64, dtype=torch.float32).reshape(4, 4, 4) / 7.0 - 3.0
    x = image.numpy().astype(np.float64)
    planes, a, b = overlapping_index()
    pooled = extract(extractor, image, planes, ["a", "b"], PoolingConfig(), air=-1.0)
    got = {(v.region, v.layer): v.vector for v in pooled}
    cells = x.reshape(2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))  # conv-1's map: 2x avg pool
    for name, mask in (("a", a), ("b", b)):
        # conv-2 (the first conv, full grid): the mean of the image over the region, negated
        mean = x[mask].mean()
        np.testing.assert_allclose(got[(name, "conv-2")], [mean, -mean], rtol=1e-6)
        # conv-1: cell means weighted by the region's fraction of each cell
        w = mask.reshape(2, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))
        weighted = float((w * cells).sum() / w.sum())
        np.testing.assert_allclose(got[(name, "conv-1")], [weighted, -weighted], rtol=1e-6)
    masked = extract(extractor, image, planes, ["a", "b"], PoolingConfig(mode="masked-input"), -1.0)
    got = {(v.region, v.layer): v.vector for v in masked}
    for name, mask in (("a", a), ("b", b)):
        mean = np.where(mask, x, -1.0).mean()  # air outside the region's own voxels
        np.testing.assert_allclose(got[(name, "conv-1")], [mean, -mean], rtol=1e-5, atol=1e-6)
