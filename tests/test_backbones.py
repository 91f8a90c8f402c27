"""3D backbones pretrained on CT: published weight files, the networks, their presets.

MedicalNet's network is checked against a transcription of its published
code (``Tencent/MedicalNet`` ``models/resnet.py``, written out below, the
segmentation head included) and, up to the stages it does not dilate,
against MONAI's ResNet; CT-FM's against MONAI's ``SegResEncoder`` built from
CT-FM's ``config.json``. Weight files are written here in the published
formats (MedicalNet: ``{"state_dict": {"module.<name>": tensor}}`` in a
``.pth``; CT-FM: ``model.safetensors``), with random values, BatchNorm
statistics and affine parameters included, so that a network that lost any
of them would not pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cohort.cli import options
from cohort.config import BACKBONES, INFLATED, PRESETS, ModelConfig, PreprocessConfig
from cohort.errors import ConfigError, InputError, WeightsError
from cohort.inputs.fingerprint import sha256_file
from cohort.inputs.manifest import read_manifest
from cohort.inputs.preprocess import normalise_intensity
from cohort.inputs.stages import prepare
from cohort.model.hooks import FeatureExtractor, LayerInfo, resolve_layers
from cohort.model.network import build_network, load_weights, random_weights
from cohort.synthetic import make_phantom_cohort

pytestmark = pytest.mark.timeout(300)

DEPTHS = (10, 18, 34, 50)
LAYERS = ("conv-1", "conv-3", "conv-5")
# conv-1, conv-3, conv-5 of each 3D backbone (the README's table names them)
DEFAULT_PATHS = {
    "medicalnet-resnet10": ("layer4.0.downsample.0", "layer4.0.conv1", "layer3.0.conv2"),
    "medicalnet-resnet18": ("layer4.1.conv2", "layer4.0.conv2", "layer3.1.conv2"),
    "medicalnet-resnet34": ("layer4.2.conv2", "layer4.1.conv2", "layer4.0.conv2"),
    "medicalnet-resnet50": ("layer4.2.conv3", "layer4.2.conv1", "layer4.1.conv2"),
    "ct-fm": ("layers.4.blocks.3.conv2", "layers.4.blocks.2.conv2", "layers.4.blocks.1.conv2"),
}
CHANNELS = {
    "medicalnet-resnet10": (512, 512, 256),
    "medicalnet-resnet18": (512, 512, 256),
    "medicalnet-resnet34": (512, 512, 512),
    "medicalnet-resnet50": (2048, 512, 512),
    "ct-fm": (512, 512, 512),
}


# ----------------------------------------- MedicalNet's published code, transcribed


def _conv3x3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _shortcut_a(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    pad = torch.zeros(out.size(0), planes - out.size(1), *out.shape[2:], dtype=out.dtype)
    return torch.cat([out, pad], dim=1)


class _Residual(nn.Module):
    """What both blocks share: the shortcut, added before the last ReLU."""

    expansion = 1
    relu: nn.ReLU
    downsample: object

    def join(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        residual = self.downsample(x) if callable(self.downsample) else x
        return self.relu(out + residual)


class _Basic(_Residual):
    def __init__(
        self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: object = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.join(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))), x)


class _Bottleneck(_Residual):
    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: object = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(
            planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.join(self.bn3(self.conv3(out)), x)


class MedicalNetResNet(nn.Module):
    """``models/resnet.py`` of Tencent/MedicalNet, with its segmentation head."""

    def __init__(self, block: type[nn.Module], layers: Sequence[int], shortcut: str) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], shortcut)
        self.layer2 = self._make_layer(block, 128, layers[1], shortcut, stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], shortcut, dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], shortcut, dilation=4)
        expansion = 4 if block is _Bottleneck else 1
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(512 * expansion, 32, 2, stride=2),
            nn.BatchNorm3d(32),
            nn.ReLU(inplace=True),
            nn.Conv3d(32, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm3d(32),
            nn.ReLU(inplace=True),
            nn.Conv3d(32, 2, kernel_size=1, bias=False),
        )

    def _make_layer(
        self,
        block: type[nn.Module],
        planes: int,
        blocks: int,
        shortcut: str,
        stride: int = 1,
        dilation: int = 1,
    ) -> nn.Sequential:
        expansion = 4 if block is _Bottleneck else 1
        downsample: object = None
        if stride != 1 or self.inplanes != planes * expansion:
            if shortcut == "A":
                downsample = partial(_shortcut_a, planes=planes * expansion, stride=stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * expansion),
                )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.conv_seg(x)


MEDICALNET = {
    10: (_Basic, (1, 1, 1, 1), "B"),
    18: (_Basic, (2, 2, 2, 2), "A"),
    34: (_Basic, (3, 4, 6, 3), "A"),
    50: (_Bottleneck, (3, 4, 6, 3), "B"),
}


def medicalnet_reference(depth: int) -> nn.Module:
    block, layers, shortcut = MEDICALNET[depth]
    return MedicalNetResNet(block, layers, shortcut)


def ctfm_reference() -> nn.Module:
    """MONAI's SegResEncoder as CT-FM's config.json builds it."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    return SegResEncoder(
        spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4)
    )


# ------------------------------------------------------------------- helpers


def randomised(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random: convolutions at fan-in scale, BatchNorm statistics and affine
    parameters away from their identity values."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_mean"):
            out[key] = torch.randn(value.shape, generator=gen) * 0.3
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=gen) * 1.5 + 0.5
        elif value.dim() == 1 and key.endswith("weight"):
            out[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.dim() == 1:
            out[key] = torch.randn(value.shape, generator=gen) * 0.2
        else:
            fan_in = value[0].numel()
            out[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
    return out


def hooked(module: nn.Module, paths: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output as it left the module (cloned: later in-place ops cannot touch it)."""
    found: dict[str, torch.Tensor] = {}

    def keep(path: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            found.setdefault(path, out.detach().clone())  # returns None: the output stays

        return hook

    handles = [module.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return [found[path] for path in paths]


def ours(
    name: str, state: Mapping[str, torch.Tensor], specs: Sequence[str], x: torch.Tensor
) -> tuple[tuple[LayerInfo, ...], list[torch.Tensor]]:
    network, _ = build_network(name, state)
    layers = resolve_layers(network, specs, tuple(x.shape[2:]))  # type: ignore[arg-type]
    with torch.no_grad():
        maps = FeatureExtractor(network, layers)(x)
    return layers, [maps[spec] for spec in specs]


def assert_same(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        scale = float(b.abs().max())
        assert scale > 1e-3  # non-trivial maps
        assert float((a - b).abs().max()) <= 1e-5 * scale


def published_medicalnet(depth: int, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A MedicalNet checkpoint as published: the reference's state dict, random values,
    under "state_dict" with DataParallel's "module." prefix. Returns the bare state."""
    state = randomised(medicalnet_reference(depth).state_dict(), seed)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def published_ctfm(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    state = randomised(ctfm_reference().state_dict(), seed)
    save_file(state, str(path))
    return state


# ------------------------------------------------------------- MedicalNet


@pytest.mark.slow
@pytest.mark.parametrize("depth", DEPTHS)
def test_medicalnet_checkpoint_loads_strictly_and_matches_the_published_network(
    depth: int, tmp_path: Path
) -> None:
    name = f"medicalnet-resnet{depth}"
    path = tmp_path / f"resnet_{depth}_23dataset.pth"
    state = published_medicalnet(depth, path, seed=depth)
    weights = load_weights(ModelConfig(name, str(path)))
    head = sorted(k for k in state if k.startswith("conv_seg."))
    assert len(head) == 14  # a transposed conv (weight, bias), 2 convs, 2 BatchNorms (5 each)
    assert weights.dropped == tuple(head)
    assert set(weights.state_dict) == set(state) - set(head)
    assert weights.sha256 == sha256_file(path)

    reference = medicalnet_reference(depth)
    reference.load_state_dict(state)
    x = torch.randn(1, 1, 20, 24, 28, generator=torch.Generator().manual_seed(depth))
    layers, maps = ours(name, weights.state_dict, LAYERS, x)
    assert tuple(info.module_path for info in layers) == DEFAULT_PATHS[name]
    assert tuple(info.channels for info in layers) == CHANNELS[name]
    assert_same(maps, hooked(reference, DEFAULT_PATHS[name], x))


def test_medicalnet_runs_monai_resnet_up_to_the_dilated_stages(tmp_path: Path) -> None:
    from monai.networks.nets import resnet10

    state = published_medicalnet(10, tmp_path / "r10.pth", seed=3)
    weights = load_weights(ModelConfig("medicalnet-resnet10", str(tmp_path / "r10.pth")))
    monai = resnet10(
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )
    monai.load_state_dict({k: v for k, v in state.items() if not k.startswith("conv_seg.")})
    x = torch.randn(1, 1, 20, 24, 28, generator=torch.Generator().manual_seed(1))
    paths = ("layer1.0.conv2", "layer2.0.downsample.0", "layer2")
    _, maps = ours("medicalnet-resnet10", weights.state_dict, paths, x)
    assert_same(maps, hooked(monai, paths, x))
    # from layer3 on MedicalNet keeps stride 1 and dilates; MONAI's own layout strides
    _, (deep,) = ours("medicalnet-resnet10", weights.state_dict, ["layer4"], x)
    assert deep.shape[2:] == (3, 3, 4) != hooked(monai, ["layer4"], x)[0].shape[2:]


def test_medicalnet_file_variants_and_refusals(tmp_path: Path) -> None:
    name, depth = "medicalnet-resnet18", 18
    state = published_medicalnet(depth, tmp_path / "published.pth", seed=2)
    encoder = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}
    reference = load_weights(ModelConfig(name, str(tmp_path / "published.pth")))
    # bare, without the head, without "module." nor the BatchNorm counters: the same tensors
    bare = {k: v for k, v in encoder.items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "bare.pth")
    loaded = load_weights(ModelConfig(name, str(tmp_path / "bare.pth")))
    assert loaded.dropped == ()
    for key, value in reference.state_dict.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.state_dict[key], value), key

    missing = {f"module.{k}": v for k, v in state.items() if k != "layer3.0.bn1.running_var"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing 1 tensors \(layer3\.0\.bn1\.running_var\)"):
        load_weights(ModelConfig(name, str(tmp_path / "missing.pth")))
    wrong = {f"module.{k}": v for k, v in state.items()}
    wrong["module.layer2.1.conv2.weight"] = torch.zeros(128, 128, 3, 3, 1)
    torch.save({"state_dict": wrong}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"layer2\.1\.conv2\.weight has shape \(128, 128, 3"):
        load_weights(ModelConfig(name, str(tmp_path / "wrong.pth")))
    digest = sha256_file(tmp_path / "published.pth")
    with pytest.raises(WeightsError, match=f"have sha256 {digest}, expected {'0' * 64}"):
        load_weights(ModelConfig(name, str(tmp_path / "published.pth"), weights_sha256="0" * 64))


# ------------------------------------------------------------------- CT-FM


@pytest.mark.slow
def test_ctfm_safetensors_loads_strictly_and_matches_monai(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    state = published_ctfm(path, seed=5)
    assert len(state) == 161  # the published file's tensor count
    weights = load_weights(ModelConfig("ct-fm", str(path)))
    assert weights.dropped == ()
    assert weights.sha256 == sha256_file(path)
    reference = ctfm_reference()
    reference.load_state_dict(state)
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    # conv-3 and conv-5 are conv2 maps that MONAI's block then adds to in place
    layers, maps = ours("ct-fm", weights.state_dict, [*LAYERS, "layers.2.blocks"], x)
    assert tuple(info.module_path for info in layers[:3]) == DEFAULT_PATHS["ct-fm"]
    assert tuple(info.channels for info in layers[:3]) == CHANNELS["ct-fm"]
    assert_same(maps, hooked(reference, [*DEFAULT_PATHS["ct-fm"], "layers.2.blocks"], x))

    missing = {k: v for k, v in state.items() if k != "layers.3.blocks.1.norm2.weight"}
    wrong = {**state, "layers.4.downsample.weight": torch.zeros(1)}
    from safetensors.torch import save_file

    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsError, match=r"missing 1 tensors \(layers\.3\.blocks\.1\.norm2\."):
        load_weights(ModelConfig("ct-fm", str(tmp_path / "missing.safetensors")))
    save_file(wrong, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightsError, match=r"unexpected 1 tensors \(layers\.4\.downsample\."):
        load_weights(ModelConfig("ct-fm", str(tmp_path / "extra.safetensors")))
    misshaped = {**state, "conv_init.weight": torch.zeros(32, 1, 3, 3, 1)}
    save_file(misshaped, str(tmp_path / "misshaped.safetensors"))
    with pytest.raises(WeightsError, match=r"conv_init\.weight has shape \(32, 1, 3, 3, 1\)"):
        load_weights(ModelConfig("ct-fm", str(tmp_path / "misshaped.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match=r"junk\.safetensors"):
        load_weights(ModelConfig("ct-fm", str(tmp_path / "junk.safetensors")))


def test_pretrained_weights_come_from_the_cache_or_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fetched: list[str] = []

    def offline(url: str, dst: str, **_: object) -> None:
        fetched.append(url)
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cached = tmp_path / "hub" / "checkpoints" / "project-lighter--ct_fm_feature_extractor"
    url = "https://huggingface.co/project-lighter/ct_fm_feature_extractor/resolve/main/"
    with pytest.raises(WeightsError) as err:
        load_weights(ModelConfig("ct-fm", "pretrained"))
    message = str(err.value)
    assert str(cached / "model.safetensors") in message and "--weights random" in message
    assert f"{url}model.safetensors" in message and fetched == [f"{url}model.safetensors"]
    with pytest.raises(WeightsError, match="downloads are off"):
        load_weights(ModelConfig("ct-fm", "pretrained"), download=False)
    assert len(fetched) == 1

    cached.mkdir(parents=True, exist_ok=True)  # the failed download made it
    published_ctfm(cached / "model.safetensors", seed=1)
    weights = load_weights(ModelConfig("ct-fm", "pretrained"), download=False)
    assert weights.source == "pretrained" and weights.sha256 == sha256_file(
        cached / "model.safetensors"
    )
    assert f"{url}model.safetensors" in weights.detail and "Apache-2.0" in weights.detail

    name = "resnet_50_23dataset.pth"
    with pytest.raises(WeightsError, match=name) as err:
        load_weights(ModelConfig("medicalnet-resnet50", "pretrained"))
    assert "huggingface.co/TencentMedicalNet/MedicalNet-Resnet50/resolve/main/" in str(err.value)


def test_weights_choices_per_kind_of_backbone() -> None:
    with pytest.raises(ConfigError, match="--weights pretrained"):
        ModelConfig("ct-fm")  # the default, imagenet, is for the inflated backbones
    with pytest.raises(ConfigError, match="--weights imagenet"):
        ModelConfig("densenet121", "pretrained")
    with pytest.raises(ConfigError, match="inflation"):
        ModelConfig("medicalnet-resnet10", "random", inflation="centre")
    values = options.defaults(options.RUN_OPTIONS)
    for name in BACKBONES:
        cfg = options.run_config({**values, "backbone": name})
        assert cfg.model.weights == ("imagenet" if name in INFLATED else "pretrained")


@pytest.mark.parametrize("name", ["medicalnet-resnet10", "ct-fm"])
def test_random_weights_are_seeded_and_not_trivial(name: str) -> None:
    a, b, c = (random_weights(name, seed) for seed in (0, 0, 1))
    assert a.sha256 == b.sha256 != c.sha256 and a.source == "random"
    assert "MONAI" in a.detail and "seed 0" in a.detail
    conv = next(v for k, v in a.state_dict.items() if v.dim() == 5)
    assert float(conv.std()) > 0
    network, _ = build_network(name, a.state_dict)  # loads strictly
    assert not network.training


# -------------------------------------------------------------------- presets


def test_each_backbone_brings_its_preset_and_options_override_one_value() -> None:
    values = options.defaults(options.RUN_OPTIONS)
    expected = {**dict.fromkeys(INFLATED, "imagenet"), "ct-fm": "ct-fm"}
    expected |= {f"medicalnet-resnet{d}": "medicalnet" for d in DEPTHS}
    for name in BACKBONES:
        cfg = options.run_config({**values, "backbone": name})
        preset = PRESETS[expected[name]]
        pre = cfg.preprocess
        assert pre.preset == preset.name
        assert (pre.hu_min, pre.hu_max, pre.normalise, pre.axes) == (
            preset.hu_min,
            preset.hu_max,
            preset.normalise,
            preset.axes,
        )
        assert (pre.mean, pre.std, pre.target_spacing) == (
            preset.mean,
            preset.std,
            preset.target_spacing,
        )
    assert PreprocessConfig() == options.run_config(values).preprocess  # densenet121: as before
    ct = options.run_config({**values, "backbone": "ct-fm", "spacing": "keep", "axes": "SAR"})
    assert ct.preprocess.target_spacing is None and ct.preprocess.axes == "SAR"
    assert (ct.preprocess.hu_min, ct.preprocess.hu_max) == (-1024.0, 2048.0)  # the rest stays
    mn = options.run_config(
        {**values, "backbone": "medicalnet-resnet10", "normalise": "fixed", "mean_std": "0.5,0.2"}
    )
    assert (mn.preprocess.normalise, mn.preprocess.mean, mn.preprocess.std) == ("fixed", 0.5, 0.2)


def test_foreground_zscore_is_medicalnets_normalisation() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1500, size=(6, 7, 8)).astype(np.float32)
    hu[hu == 0] = 1.0  # MedicalNet replaces exact zeros by noise; none here
    cfg = PreprocessConfig.for_backbone("medicalnet-resnet34")
    got, air = normalise_intensity(hu, cfg)
    pixels = hu[hu > 0].astype(np.float64)  # itensity_normalize_one_volume
    published = (hu - pixels.mean()) / pixels.std()
    np.testing.assert_allclose(got, published, rtol=0, atol=2e-5)
    # air: the window's low end under the same statistics
    low, _ = normalise_intensity(np.array([[[-5000.0, 100.0, 300.0]]], dtype=np.float32), cfg)
    assert float(low[0, 0, 0]) == pytest.approx(-1224 / 100, abs=1e-5)  # (-1024 - 200) / 100
    assert air == pytest.approx((-1024 - pixels.mean()) / pixels.std(), abs=1e-5)
    assert normalise_intensity(hu, PreprocessConfig())[1] == pytest.approx(-0.449 / 0.226)
    with pytest.raises(InputError, match=r"no voxel above 0 HU.*--normalise fixed"):
        normalise_intensity(np.full((4, 4, 4), -500.0, dtype=np.float32), cfg, "image x.nii")


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_ctfm_preset_gives_ctfm_own_preprocessing(tmp_path: Path) -> None:
    """CT-FM's published transforms (MONAI: LoadImage, Orientation SPL, ScaleIntensityRange
    -1024..2048 to 0..1 clipped) on an image stored in another orientation."""
    from monai.transforms import LoadImage, Orientation, ScaleIntensityRange

    manifest = make_phantom_cohort(tmp_path / "c", n_per_cohort=1, shape=(20, 24, 28), seed=3)
    subject = read_manifest(manifest)[0]
    stored = nib.load(subject.image)
    lps = stored.as_reoriented(nib.orientations.axcodes2ornt(("P", "S", "L")))  # type: ignore[attr-defined]
    nib.save(lps, tmp_path / "psl.nii.gz")
    mask = nib.load(subject.mask)
    nib.save(
        mask.as_reoriented(nib.orientations.axcodes2ornt(("P", "S", "L"))),  # type: ignore[attr-defined]
        tmp_path / "psl-mask.nii.gz",
    )
    cfg = PreprocessConfig.for_backbone("ct-fm", target_spacing=None)  # CT-FM resamples too
    labels = (("tibia", 1), ("femur", 2))
    prepared = prepare(tmp_path / "psl.nii.gz", tmp_path / "psl-mask.nii.gz", labels, True, cfg)
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "psl.nii.gz"))
    image = ScaleIntensityRange(a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=True)(
        Orientation(axcodes="SPL", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    )
    np.testing.assert_allclose(prepared.image, np.asarray(image)[0], rtol=0, atol=1e-6)
    # the regions are flipped with the image: the same voxels as in RAS+
    ras = prepare(subject.image, subject.mask, labels, True, PreprocessConfig())
    np.testing.assert_array_equal(prepared.region_index, ras.region_index[:, ::-1, ::-1])
    assert prepared.voxels == ras.voxels and prepared.air == 0.0


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", sorted(DEFAULT_PATHS))
def test_default_layers_per_backbone(name: str) -> None:
    network, _ = build_network(name, random_weights(name, 0).state_dict)
    layers = resolve_layers(network, LAYERS, (24, 24, 24))
    assert tuple(info.module_path for info in layers) == DEFAULT_PATHS[name]
    assert tuple(info.channels for info in layers) == CHANNELS[name]
