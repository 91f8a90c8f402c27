"""The lean forward pass (depth streaming, one buffer per dense block) against the plain one.

The lean pass must give the plain pass's hooked maps, wherever the chunk
boundaries fall (before, on and after each halo, at every stride), and its
peak memory must grow by at most 20 bytes per input voxel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bench.memory import one_hot_weights, peak_bytes
from cohort.config import PoolingConfig
from cohort.model import lean, pooling
from cohort.model.hooks import FeatureExtractor, resolve_layers, trace
from cohort.model.lean import compose, depth_chain, out_length
from cohort.model.network import build_network
from cohort.model.pooling import extract, region_weights
from tests.test_model import seeded_state

DEPTH = 45  # odd; chunks of 4, 7, 8, 11, 16 slices do not divide it, 3 and 5 do
PLANE = (40, 36)
# input slices per chunk: the chunk ends fall before, on and after each halo at every
# stride (the prefix's depth stride is 8; 45: one chunk)
CHUNKS = [3, 4, 5, 7, 8, 11, 16, 45]

# every kind of hook the lean pass serves: conv-K of the last block, a streamed stage,
# a container whose output is its last child's, a dense layer's conv2 inside the
# streamed block 1, a bottleneck module of a later block (hooked: no pieces there)
DENSENET_SPECS = [
    "conv-1",
    "conv-3",
    "conv-5",
    "features.pool0",
    "features.denseblock1",
    "features.denseblock1.denselayer4.conv2",
    "features.transition1",
    "features.denseblock2.denselayer3.conv1",
    "features.denseblock3",
]
RESNET_SPECS = ["layer4.1.conv2", "layer4.0.conv2", "layer3.1.conv2", "layer1", "layer2.0"]


@pytest.fixture(autouse=True)
def thin_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense layers split their depth into pieces here too (the volumes are small)."""
    monkeypatch.setattr(lean, "MIN_PIECE_VOXELS", 1)


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    network, _ = build_network("densenet121", seeded_state("densenet121", 4))
    return network


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    network, _ = build_network("resnet18", seeded_state("resnet18", 4))
    return network


def _volume(depth: int = DEPTH, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, 1, depth, *PLANE), generator=gen)


def _assert_same_maps(
    got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float = 1e-6
) -> None:
    assert list(got) == list(ref)
    for layer, r in ref.items():
        g = got[layer]
        assert g.shape == r.shape, layer
        scale = r.abs().max().item()
        assert scale > 0, layer
        gap = (g - r).abs().max().item()
        assert gap <= rel * scale, f"{layer}: max |lean - plain| {gap:.3g}, scale {scale:.3g}"


def _maps(
    network: nn.Module, specs: list[str], x: torch.Tensor, **kwargs: Any
) -> dict[str, torch.Tensor]:
    layers = resolve_layers(network, specs, (x.shape[2], x.shape[3], x.shape[4]))
    with torch.inference_mode():
        return FeatureExtractor(network, layers, **kwargs)(x)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("slices", CHUNKS)
@pytest.mark.parametrize(
    ("network", "specs"), [("densenet", DENSENET_SPECS), ("resnet", RESNET_SPECS)]
)
def test_lean_equals_plain(
    network: str, specs: list[str], slices: int, request: pytest.FixtureRequest
) -> None:
    """DenseNet121 and a ResNet, streamed in chunks of ``slices`` slices, against one pass."""
    model = request.getfixturevalue(network)
    x = _volume()
    ref = _maps(model, specs, x, lean=False)
    got = _maps(model, specs, x, chunk_voxels=slices * PLANE[0] * PLANE[1])
    _assert_same_maps(got, ref)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "specs",
    [
        ["features.denseblock1.denselayer2.conv2"],  # the pass ends inside the streamed block
        ["features.denseblock1.denselayer5.norm1", "conv-1"],  # a hook the stream cannot serve
        ["conv-120", "features.transition2.pool"],  # the stem conv, a streamed transition
        ["features.denseblock4.denselayer16", "features.norm5"],  # a layer, past the last block
    ],
)
def test_lean_serves_any_hook(densenet: nn.Module, specs: list[str]) -> None:
    x = _volume(depth=38, seed=2)
    ref = _maps(densenet, specs, x, lean=False)
    got = _maps(densenet, specs, x, chunk_voxels=6 * PLANE[0] * PLANE[1])
    _assert_same_maps(got, ref)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inflation", ["mean", "centre"])
def test_lean_without_factorisation_equals_plain(inflation: str) -> None:
    """Plain Conv3d layers (and centre-inflated ones) take the lean pass's generic path."""
    state = seeded_state("densenet121", 5)
    factorised, _ = build_network("densenet121", state, inflation)  # type: ignore[arg-type]
    plain, _ = build_network("densenet121", state, inflation, factorised=False)  # type: ignore[arg-type]
    x = _volume(depth=29, seed=3)
    specs = ["conv-1", "conv-5", "features.denseblock1.denselayer6.conv2"]
    ref = _maps(factorised, specs, x, lean=False)
    got = _maps(plain, specs, x, chunk_voxels=5 * PLANE[0] * PLANE[1])
    _assert_same_maps(got, ref, rel=1e-5)  # plain and factorised convolutions sum differently
    _assert_same_maps(_maps(factorised, specs, x, chunk_voxels=5 * PLANE[0] * PLANE[1]), ref)


@pytest.mark.timeout(120)
def test_lean_region_vectors_equal_plain(densenet: nn.Module) -> None:
    """What the feature actor stores: masked-pool vectors, lean (the default) vs plain."""
    image = _volume(depth=64, seed=4)[0, 0]
    index = torch.full(image.shape, 2, dtype=torch.uint8)
    index[8:40, 5:30, 4:20] = 0
    index[30:60, 10:35, 18:34] = 1
    names = ["tibia", "femur", "background"]
    layers = resolve_layers(densenet, ["conv-1", "conv-3", "conv-5"], (64, *PLANE))
    plain = FeatureExtractor(densenet, layers, lean=False)
    lean = FeatureExtractor(densenet, layers, chunk_voxels=7 * PLANE[0] * PLANE[1])
    cfg = PoolingConfig(min_coverage=0.0)
    ref = extract(plain, image, index, names, cfg, air=-1.0)
    got = extract(lean, image, index, names, cfg, air=-1.0)
    scale = max(float(np.abs(v.vector).max()) for v in ref)
    gap = max(float(np.abs(a.vector - b.vector).max()) for a, b in zip(got, ref, strict=True))
    assert [(v.region, v.layer) for v in got] == [(v.region, v.layer) for v in ref]
    assert gap <= 1e-6 * scale, gap / scale


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("shape", "grid"),
    [
        ((13, 17, 11), (4, 5, 3)),  # cells of unequal size, overlapping
        ((64, 32, 48), (2, 1, 3)),  # exact blocks
        ((37, 50, 23), (5, 7, 6)),
        ((9, 8, 7), (9, 8, 7)),  # one voxel per cell
        ((40, 30, 20), (1, 1, 1)),
    ],
)
def test_region_weights_equal_one_hot_pooling(
    shape: tuple[int, int, int], grid: tuple[int, int, int]
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    index = torch.randint(0, 5, shape, generator=gen, dtype=torch.uint8)
    index[index == 4] = 255  # no region
    got = region_weights(index, 4, grid)
    ref = one_hot_weights(index, 4, grid)  # the formula it replaced
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.timeout(60)
def test_depth_geometry_matches_the_modules(densenet: nn.Module, resnet: nn.Module) -> None:
    """The depth windows composed op by op give each op's output depth, at any input depth."""
    assert compose([(7, 2, 3), (3, 2, 1)]) == (11, 4, 5)  # stem conv, then max pool
    for network, trunk, prefix in (
        (densenet, densenet.features, "features."),
        (resnet, resnet, ""),
    ):
        assert isinstance(trunk, nn.Sequential)
        for depth in (61, 62, 63, 64):
            shapes = {t.path: t.shape for t in trace(network, (depth, 64, 64))}
            chain: list[tuple[int, int, int]] = []
            for name, child in trunk.named_children():
                windows = depth_chain(child)
                assert windows is not None, name
                chain += windows
                shape = shapes[prefix + name]
                assert shape is not None
                assert out_length(depth, chain) == shape[2], (name, depth)
    assert depth_chain(nn.MaxPool3d(3, 2, 1, ceil_mode=True)) is None
    assert depth_chain(nn.BatchNorm3d(4).train()) is None
    assert depth_chain(nn.Conv3d(2, 2, 3, padding=1, padding_mode="circular")) is None


def _slope(
    fn_small: Callable[[], object], fn_large: Callable[[], object], voxels: tuple[int, int]
) -> float:
    small = peak_bytes(fn_small)
    large = peak_bytes(fn_large)
    return (large - small) / (voxels[1] - voxels[0])


@pytest.mark.timeout(120)
def test_lean_peak_grows_by_at_most_20_bytes_per_voxel(densenet: nn.Module) -> None:
    """The feature actor's call (forward + masked-pool, 3 regions), measured with the
    allocator's events: the peak's growth between two depths, so fixed costs cancel."""
    plane = (64, 64)
    depths = (64, 128)
    layers = resolve_layers(densenet, ["conv-1", "conv-3", "conv-5"], (depths[0], *plane))
    names = ["tibia", "femur", "background"]

    def call(depth: int, lean: bool) -> Callable[[], object]:
        image = torch.randn((depth, *plane))
        index = torch.full(image.shape, 2, dtype=torch.uint8)
        index[: depth // 2, :32] = 0
        index[depth // 2 :, 32:] = 1
        ex = FeatureExtractor(densenet, layers, lean=lean, chunk_voxels=8 * plane[0] * plane[1])
        return lambda: extract(ex, image, index, names, PoolingConfig(), air=-1.0)

    voxels = (depths[0] * plane[0] * plane[1], depths[1] * plane[0] * plane[1])
    lean = _slope(call(depths[0], True), call(depths[1], True), voxels)
    plain = _slope(call(depths[0], False), call(depths[1], False), voxels)
    assert plain > 40, f"the measurement sees only {plain:.1f} bytes per voxel for the plain pass"
    assert lean <= 20, f"lean peak grows by {lean:.1f} bytes per input voxel"


@pytest.mark.timeout(60)
def test_region_weights_peak_does_not_grow_with_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old one-hot masks took 5 bytes per voxel and region; the counts read the index
    in slabs of a fixed size (here 4 slices) and keep nothing of the volume's size."""
    monkeypatch.setattr(pooling, "_SLAB_VOXELS", 4 * 128 * 128)
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 3, (64, 128, 128), generator=gen, dtype=torch.uint8)
    large = torch.randint(0, 3, (256, 128, 128), generator=gen, dtype=torch.uint8)
    grid = (4, 4, 4)
    slope = _slope(
        lambda: region_weights(small, 3, grid),
        lambda: region_weights(large, 3, grid),
        (small.numel(), large.numel()),
    )
    assert slope <= 0.1, f"region_weights' peak grows by {slope:.2f} bytes per voxel"
