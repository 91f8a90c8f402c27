"""The inflated network against torchvision's own 2D networks."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models

from cohort.config import BACKBONES, ModelConfig
from cohort.errors import ConfigError, InflationError, ModelError, WeightsError
from cohort.inputs.fingerprint import sha256_file
from cohort.model.hooks import FeatureExtractor, resolve_layers, trace
from cohort.model.inflate import inflate, inflate_kernel
from cohort.model.network import BACKBONES as REGISTRY
from cohort.model.network import (
    backbone,
    build_network,
    imagenet_cache_path,
    load_weights,
)

# Module paths hooked in the 2D and 3D networks alike: the last, 3rd-last and
# 5th-last convolutions, and one block output.
DENSENET_LAYERS = {
    "conv-1": "features.denseblock4.denselayer16.conv2",
    "conv-3": "features.denseblock4.denselayer15.conv2",
    "conv-5": "features.denseblock4.denselayer14.conv2",
}
# ResNet hooks by module path (its conv-3 would be the downsample shortcut)
RESNET_LAYERS = {path: path for path in ("layer4.1.conv2", "layer4.0.conv2", "layer3.1.conv2")}
TORCHVISION = {"densenet121": models.densenet121, "resnet18": models.resnet18}


def seeded_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """torchvision's init under a seed, with BatchNorm statistics and affine made non-trivial.

    Default BatchNorm (mean 0, var 1, weight 1, bias 0) is close to identity, so a
    network that lost its statistics would still pass; these values would not.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TORCHVISION[name]()
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=gen) * 0.3
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=gen) * 1.5 + 0.5
        elif key.endswith(".weight") and value.dim() == 1:
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif (
            key.endswith(".bias")
            and value.dim() == 1
            and "fc" not in key
            and "classifier" not in key
        ):
            state[key] = torch.randn(value.shape, generator=gen) * 0.2
    return state


def receptive_field(network: nn.Module, path: str) -> int:
    """Upper bound of the depth receptive field at ``path``: every conv and pool
    that runs before it, taken as one chain (dense and residual branches are shorter)."""
    field, jump = 1, 1
    for traced in trace(network, (64, 64, 64)):
        module = traced.module
        if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            k = _first(module.kernel_size)
            dilation = _first(getattr(module, "dilation", 1))
            field += (k - 1) * dilation * jump
            jump *= _first(module.stride)
        if traced.path == path:
            return field
    raise AssertionError(f"{path} not run")


def _first(value: object) -> int:
    return value if isinstance(value, int) else int(value[0])  # type: ignore[index]


def hooked_2d(model: nn.Module, paths: dict[str, str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda _m, _i, o, layer=layer: out.__setitem__(layer, o)
        )
        for layer, path in paths.items()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("name", "paths"), [("densenet121", DENSENET_LAYERS), ("resnet18", RESNET_LAYERS)]
)
def test_boring_volume_equals_2d_network(name: str, paths: dict[str, str]) -> None:
    state = seeded_state(name, seed=7)
    model2d = TORCHVISION[name]()
    model2d.load_state_dict(state)
    model2d.eval()
    network, _ = build_network(name, state)
    layers = resolve_layers(network, list(paths))
    assert [info.module_path for info in layers] == list(paths.values())

    size = 32
    field = max(receptive_field(network, path) for path in paths.values())
    depth = (field // 32 + 4) * 32  # the centre output sees no depth border
    torch.manual_seed(3)
    slice2d = torch.rand(1, 1, size, size) * 4 - 2
    reference = hooked_2d(model2d, paths, slice2d.expand(1, 3, size, size))
    volume = slice2d.unsqueeze(2).expand(1, 1, depth, size, size).contiguous()
    with torch.no_grad():
        got = FeatureExtractor(network, layers)(volume)
    for layer, ref in reference.items():
        centre = got[layer].shape[2] // 2
        # the centre's receptive field, in input slices, lies inside the volume
        stride = depth // got[layer].shape[2]
        assert centre * stride - field // 2 > 0
        assert centre * stride + field // 2 < depth
        diff = (got[layer][:, :, centre] - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert scale > 0
        assert diff <= 1e-4 * scale, (
            f"{name} {layer}: max |3D - 2D| {diff:.3g} vs scale {scale:.3g}"
        )


def test_gray_stem_equals_rgb_copy() -> None:
    state = seeded_state("densenet121", seed=1)
    gray, _ = build_network("densenet121", state, gray_stem=True)
    rgb, _ = build_network("densenet121", state, gray_stem=False)
    assert gray.get_submodule("features.conv0").weight.shape == (64, 1, 7, 7, 7)
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 48, 40)
    specs = ["conv-1", "conv-5", "features.denseblock2"]
    with torch.no_grad():
        a = FeatureExtractor(gray, resolve_layers(gray, specs))(x)
        b = FeatureExtractor(rgb, resolve_layers(rgb, specs, in_channels=3))(
            x.expand(1, 3, -1, -1, -1)
        )
    for layer in specs:
        rel = (a[layer] - b[layer]).abs().max() / b[layer].abs().max()
        assert rel <= 1e-5, layer


def test_inflated_kernels_by_hand() -> None:
    w = torch.arange(18, dtype=torch.float32).reshape(1, 2, 3, 3)
    mean = inflate_kernel(w, 3, "mean")
    assert mean.shape == (1, 2, 3, 3, 3)
    for t in range(3):
        assert torch.equal(mean[:, :, t], w / 3)
    centre = inflate_kernel(w, 3, "centre")
    assert torch.equal(centre[:, :, 1], w)
    assert centre[:, :, 0].abs().sum() == 0 and centre[:, :, 2].abs().sum() == 0
    # an impulse through an inflated conv returns the kernel, scaled by 1/k per depth
    conv2d = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv2d.weight.copy_(torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3))
    conv3d, _ = inflate(conv2d)
    impulse = torch.zeros(1, 1, 5, 5, 5)
    impulse[0, 0, 2, 2, 2] = 1.0
    with torch.no_grad():
        response = conv3d(impulse)[0, 0]
    flipped = conv2d.weight[0, 0].flip(0).flip(1)  # correlation returns the kernel reversed
    for t in (1, 2, 3):
        assert torch.allclose(response[t, 1:4, 1:4], flipped / 3)
    assert response[0].abs().sum() == 0 and response[4].abs().sum() == 0


def test_layer_geometry_copied_to_depth() -> None:
    tree = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2, bias=True),
        nn.Conv2d(8, 8, 1),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d(2, stride=2, count_include_pad=False),
        nn.BatchNorm2d(8),
    )
    out, report = inflate(tree)
    conv, one, pool, avg, bn = out
    assert isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3)
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == (
        (2, 2, 2),
        (1, 1, 1),
        (2, 2, 2),
        2,
    )
    assert isinstance(one, nn.Conv3d) and one.kernel_size == (1, 1, 1)  # 1x1 stays 1x1x1
    assert torch.equal(one.weight[..., 0], tree[1].weight)
    assert isinstance(pool, nn.MaxPool3d) and pool.ceil_mode and pool.kernel_size == (3, 3, 3)
    assert isinstance(avg, nn.AvgPool3d) and avg.count_include_pad is False
    assert isinstance(bn, nn.BatchNorm3d)
    assert set(report.transferred) == set(tree.state_dict())


def test_densenet_kernels_are_cubes_and_1x1_stays_1x1() -> None:
    network, report = build_network("densenet121", seeded_state("densenet121", 2))
    twod = models.densenet121().features
    for path, module in network.named_modules():
        if isinstance(module, nn.Conv3d):
            source = twod.get_submodule(path.removeprefix("features."))
            kh, kw = source.kernel_size
            assert module.kernel_size == (kh, kh, kw), path
    assert set(report.dropped) == {"classifier.weight", "classifier.bias"}
    bn = network.get_submodule("features.denseblock3.denselayer5.norm1")
    state = seeded_state("densenet121", 2)
    assert torch.equal(bn.running_var, state["features.denseblock3.denselayer5.norm1.running_var"])


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(InflationError, match=r"GELU at '1\.act'"):
        inflate(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(OrderedDict(act=nn.GELU()))))

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)

    with pytest.raises(InflationError, match="Custom at '<root>'"):
        inflate(Custom())


def test_tensor_not_carried_over_is_an_error() -> None:
    seq = nn.Sequential(nn.Conv2d(1, 1, 1))
    seq.register_buffer("scale", torch.ones(1))  # a tensor of a pass-through container
    with pytest.raises(InflationError, match="holds tensors of its own"):
        inflate(seq)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_weights_file_missing_and_extra_keys_are_named(tmp_path: Path) -> None:
    state = seeded_state("resnet18", 0)
    missing = dict(state)
    del missing["layer2.0.bn1.running_var"]
    with pytest.raises(WeightsError, match=r"missing 1 keys \(layer2\.0\.bn1\.running_var\)"):
        load_weights(ModelConfig("resnet18", str(_save(missing, tmp_path / "m.pth"))))
    extra = {**state, "head.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=r"unexpected 1 keys \(head\.weight\)"):
        load_weights(ModelConfig("resnet18", str(_save(extra, tmp_path / "e.pth"))))


def test_weights_file_sha256_checked_and_legacy_keys_mapped(tmp_path: Path) -> None:
    import hashlib

    state = seeded_state("densenet121", 4)
    legacy = {
        key.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): value
        for key, value in state.items()
    }
    path = _save(legacy, tmp_path / "legacy.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_weights(ModelConfig("densenet121", str(path), weights_sha256=digest))
    assert loaded.sha256 == digest == sha256_file(path)
    assert torch.equal(
        loaded.state_dict["features.denseblock1.denselayer1.norm1.weight"],
        state["features.denseblock1.denselayer1.norm1.weight"],
    )
    with pytest.raises(WeightsError, match=f"have sha256 {digest}, expected {'0' * 64}"):
        load_weights(ModelConfig("densenet121", str(path), weights_sha256="0" * 64))


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        load_weights(ModelConfig("resnet18", str(path)))


def test_missing_imagenet_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url: str, dst: str, **_: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    assert imagenet_cache_path("densenet121") == expected
    with pytest.raises(WeightsError) as err:
        load_weights(ModelConfig())
    message = str(err.value)
    assert str(expected) in message
    assert "densenet121-a639ec97.pth" in message and "--weights random" in message
    assert "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    # a file there whose hash does not fit torchvision's name is refused, naming both
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seeded_state("densenet121", 0), expected)
    with pytest.raises(WeightsError, match="corrupt") as err:
        load_weights(ModelConfig())
    assert sha256_file(expected) in str(err.value)  # the file's own hash, in full
    assert "a639ec97" in str(err.value)  # the hash prefix its name promises


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ConfigError, match="densenet121"):
        ModelConfig(backbone="vgg16", weights="random")
    with pytest.raises(ModelError, match="densenet121"):
        backbone("vgg16")


def test_config_backbone_names_are_the_registry() -> None:
    # the CLI lists config.BACKBONES without importing torch; each must be buildable
    assert set(BACKBONES) == set(REGISTRY)


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    network, _ = build_network("densenet121", seeded_state("densenet121", 5))
    return network


def test_default_hooks_are_distinct_layers(densenet: nn.Module) -> None:
    layers = resolve_layers(densenet, ["conv-1", "conv-3", "conv-5"], (64, 64, 64))
    assert {info.layer: info.module_path for info in layers} == DENSENET_LAYERS
    assert [info.channels for info in layers] == [32, 32, 32]
    assert all(info.grid == (2, 2, 2) for info in layers)
    torch.manual_seed(1)
    with torch.no_grad():
        maps = FeatureExtractor(densenet, layers)(torch.randn(1, 1, 64, 64, 64))
    tensors = list(maps.values())
    for i in range(3):
        for j in range(i + 1, 3):
            assert tensors[i].data_ptr() != tensors[j].data_ptr()
            assert not torch.allclose(tensors[i], tensors[j])


def test_module_path_and_out_of_range_specs(densenet: nn.Module) -> None:
    (block,) = resolve_layers(densenet, ["features.denseblock4"], (96, 128, 128))
    assert (block.channels, block.grid) == (1024, (3, 4, 4))
    (stem,) = resolve_layers(densenet, ["conv-120"])
    assert stem.module_path == "features.conv0"
    with pytest.raises(ModelError, match=r"1 <= K <= 120"):
        resolve_layers(densenet, ["conv-121"])
    with pytest.raises(ModelError, match="does not exist"):
        resolve_layers(densenet, ["features.denseblock9"])
    with pytest.raises(ModelError, match="same module"):
        resolve_layers(densenet, ["conv-1", DENSENET_LAYERS["conv-1"]])


def test_forward_stops_after_last_hook(densenet: nn.Module) -> None:
    """No module after the last hooked one runs (the denselayer16 and norm5 leaves)."""
    leaves = {p: m for p, m in densenet.named_modules() if p and not list(m.children())}
    order = [t.path for t in trace(densenet, (32, 32, 32)) if t.path in leaves]
    last = order.index(DENSENET_LAYERS["conv-3"])
    ran: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, path=path: ran.append(path))
        for path, module in leaves.items()
    ]
    try:
        extractor = FeatureExtractor(densenet, resolve_layers(densenet, ["conv-5", "conv-3"]))
        with torch.no_grad():
            extractor(torch.zeros(1, 1, 32, 32, 32))
        after = order[last + 1 :]
        assert "features.denseblock4.denselayer16.conv1" in after
        assert not set(after) & set(ran), sorted(set(after) & set(ran))
        assert {DENSENET_LAYERS["conv-3"], DENSENET_LAYERS["conv-5"]} <= set(ran)
        ran.clear()
        extractor.stop_early = False
        with torch.no_grad():
            extractor(torch.zeros(1, 1, 32, 32, 32))
        assert set(after) <= set(ran)
        assert ran[-1] == "features.norm5"
    finally:
        for handle in handles:
            handle.remove()


def test_conv_order_is_execution_order_not_registration() -> None:
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv3d(2, 3, 1)  # registered first, runs last
            self.early = nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(x))

    layers = resolve_layers(Swapped(), ["conv-1", "conv-2"], (4, 4, 4))
    assert [(info.module_path, info.channels) for info in layers] == [("late", 3), ("early", 2)]
