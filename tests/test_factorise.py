"""Depth-factorised layers against torch's own 3D convolution and pooling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cohort.errors import ModelError
from cohort.model.factorise import (
    DepthFactorisedConv3d,
    SeparableMaxPool3d,
    depth_profile,
    factorise,
    window_reduce,
)
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.inflate import inflate_kernel
from cohort.model.network import build_network
from tests.test_model import seeded_state

WINDOWS = [(3, 1, 1), (3, 2, 1), (7, 2, 3), (2, 2, 0), (3, 1, 0), (4, 3, 2)]


@pytest.mark.parametrize(
    ("n", "kernel", "stride", "padding"),
    [(n, *w) for n in (1, 2, 5, 8, 13) for w in WINDOWS if n + 2 * w[2] >= w[0]],
)
def test_window_reduce_equals_padded_unfold(n: int, kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(n * 100 + kernel)
    x = torch.randn(2, 3, n, 4, 5)
    windows = F.pad(x, (0, 0, 0, 0, padding, padding)).unfold(2, kernel, stride)
    got_sum = window_reduce(x, 2, kernel, stride, padding, "sum")
    assert got_sum.shape == windows.shape[:-1]
    assert torch.allclose(got_sum, windows.sum(-1), atol=1e-6)
    # max along the last axis: padding is skipped, as max pooling pads with -inf
    y = x.transpose(2, 4).contiguous()
    windows = F.pad(y, (padding, padding), value=float("-inf")).unfold(4, kernel, stride)
    assert torch.equal(window_reduce(y, 4, kernel, stride, padding, "max"), windows.amax(-1))


def test_window_too_large_is_an_error() -> None:
    with pytest.raises(ModelError, match="does not fit"):
        window_reduce(torch.zeros(1, 1, 2, 3, 3), 2, 7, 1, 1, "sum")


def _conv(
    cin: int, cout: int, k: int, stride: int, padding: int, *, bias: bool, groups: int = 1
) -> nn.Conv3d:
    conv = nn.Conv3d(cin, cout, k, stride=stride, padding=padding, bias=bias, groups=groups)
    if bias and conv.bias is not None:
        nn.init.normal_(conv.bias)
    return conv


CASES = [
    # (in, out, kernel, stride, padding, bias, groups): both sides of the depth sum
    (1, 8, 7, 2, 3, False, 1),  # a stem: sum on the input
    (16, 4, 3, 1, 1, False, 1),  # a dense layer: sum on the output
    (16, 4, 3, 1, 1, True, 1),  # with a bias, added after the sum
    (6, 6, 3, 2, 1, True, 1),  # strided in depth: sum on the input
    (8, 8, 3, 1, 0, False, 2),  # no padding, grouped
    (4, 12, 5, 1, 2, True, 1),
]


@pytest.mark.parametrize("method", ["mean", "centre"])
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "bias", "groups"), CASES)
def test_factorised_conv_equals_conv3d(
    method: str, cin: int, cout: int, k: int, stride: int, padding: int, bias: bool, groups: int
) -> None:
    torch.manual_seed(k * 10 + cin)
    conv = _conv(cin, cout, k, stride, padding, bias=bias, groups=groups)
    with torch.no_grad():
        plane = torch.randn(cout, cin // groups, k, k)
        conv.weight.copy_(inflate_kernel(plane, k, method))  # type: ignore[arg-type]
    twin = DepthFactorisedConv3d.from_conv(conv)
    if method == "centre" and padding != k // 2:
        assert twin is None  # the middle slice would be read at an offset: not handled
        return
    assert twin is not None and twin.profile == method
    assert twin.weight is conv.weight  # shares the parameter, same state-dict key
    x = torch.randn(2, cin, 11, 9, 10)
    with torch.no_grad():
        ref = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, 1, groups)
        got = twin(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_kernels_without_a_depth_profile_stay_plain() -> None:
    torch.manual_seed(0)
    assert depth_profile(torch.randn(2, 2, 3, 3, 3)) is None
    assert depth_profile(torch.randn(2, 2, 1, 3, 3)) is None
    flat = inflate_kernel(torch.randn(2, 2, 3, 3), 3, "mean")
    assert depth_profile(flat) == "mean"
    flat[0, 0, 1, 0, 0] += 1e-3  # one value off: no longer depth-constant
    assert depth_profile(flat) is None
    unprofiled = [
        nn.Conv3d(2, 2, 3, padding=1),  # random kernel
        nn.Conv3d(2, 2, 3, padding="same"),
        nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv3d(2, 2, 3, padding=2, dilation=2),
    ]
    with torch.no_grad():
        for conv in unprofiled[1:]:
            conv.weight.copy_(inflate_kernel(torch.randn(2, 2, 3, 3), 3, "mean"))
    for conv in unprofiled:
        assert DepthFactorisedConv3d.from_conv(conv) is None


def test_loading_a_kernel_without_the_profile_is_refused() -> None:
    conv = nn.Conv3d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(inflate_kernel(torch.randn(3, 2, 3, 3), 3, "mean"))
    twin = DepthFactorisedConv3d.from_conv(conv)
    assert twin is not None
    with pytest.raises(ModelError, match="depth profile"):
        twin.load_state_dict({"weight": torch.randn(3, 2, 3, 3, 3)})


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 2, 1), (2, 2, 0), ((3, 1, 3), (2, 1, 2), (1, 0, 1))]
)
def test_separable_max_pool_equals_max_pool3d(
    kernel: object, stride: object, padding: object
) -> None:
    pool = nn.MaxPool3d(kernel, stride=stride, padding=padding)  # type: ignore[arg-type]
    twin = SeparableMaxPool3d.from_pool(pool)
    assert twin is not None
    x = torch.randn(2, 3, 9, 12, 7)
    assert torch.equal(twin(x), pool(x))
    assert SeparableMaxPool3d.from_pool(nn.MaxPool3d(3, 2, 1, ceil_mode=True)) is None
    assert SeparableMaxPool3d.from_pool(nn.MaxPool3d(3, 2, 1, return_indices=True)) is None


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("name", "inflation", "specs"),
    [
        ("densenet121", "mean", ["conv-1", "conv-5", "features.denseblock1"]),
        ("densenet121", "centre", ["conv-1", "features.denseblock2"]),
        ("resnet18", "mean", ["layer4.1.conv2", "layer2"]),
    ],
)
def test_factorised_network_equals_plain_network(
    name: str, inflation: str, specs: list[str]
) -> None:
    state = seeded_state(name, seed=4)
    fast, _ = build_network(name, state, inflation, factorised=True)  # type: ignore[arg-type]
    plain, _ = build_network(name, state, inflation, factorised=False)  # type: ignore[arg-type]
    swapped = [p for p, m in fast.named_modules() if type(m) is not type(plain.get_submodule(p))]
    convs = [
        p for p, m in plain.named_modules() if isinstance(m, nn.Conv3d) and m.kernel_size[0] > 1
    ]
    assert sorted(p for p in swapped if "pool" not in p) == sorted(convs)
    assert list(fast.state_dict()) == list(plain.state_dict())
    fast_layers = resolve_layers(fast, specs, (40, 64, 48))
    assert fast_layers == resolve_layers(plain, specs, (40, 64, 48))
    torch.manual_seed(1)
    x = torch.randn(1, 1, 40, 64, 48)
    with torch.no_grad():
        got = FeatureExtractor(fast, fast_layers)(x)
        ref = FeatureExtractor(plain, fast_layers)(x)
    for layer in specs:
        scale = ref[layer].abs().max()
        assert scale > 0
        assert (got[layer] - ref[layer]).abs().max() <= 1e-4 * scale, layer


def test_factorise_reports_what_changed() -> None:
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Conv3d(2, 2, 1))
    with torch.no_grad():
        net[0].weight.copy_(inflate_kernel(torch.randn(2, 1, 3, 3), 3, "centre"))
    assert factorise(net) == ["0", "1"]
    assert isinstance(net[0], DepthFactorisedConv3d) and isinstance(net[1], SeparableMaxPool3d)
    assert type(net[2]) is nn.Conv3d  # 1x1x1: nothing to factorise
