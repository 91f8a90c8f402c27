"""The backbones: 3D networks inflated from torchvision's 2D ones, and 3D networks
pretrained on CT (:mod:`cohort.model.native`), behind one registry.

The registry of inflated backbones is explicit: each entry says how to build
the 2D model, where its ImageNet weights live, which conv is the stem and which
part of the model is inflated (the trunk). The classifier is left out by design
and the transfer report says so; every other 2D tensor must reach the 3D network.
:func:`load_weights`, :func:`random_weights` and :func:`build_network` take
either kind by name.

For DenseNet121 the 3D network is ``features`` only (conv0 ... denseblock4,
norm5), with the same module paths as torchvision, so the module path
``features.denseblock4.denselayer16.conv2`` means the same layer in 2D and 3D.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from cohort.config import Inflation, ModelConfig
from cohort.errors import ModelError, WeightsError
from cohort.inputs.fingerprint import sha256_file
from cohort.model.factorise import factorise
from cohort.model.inflate import TransferReport, inflate
from cohort.model.native import (
    NATIVE,
    Native,
    build_native,
    load_native,
    random_native,
)
from cohort.model.native import architecture as native_architecture
from cohort.model.weights import (
    StateDict,
    Weights,
    cached_or_downloaded,
    check_fit,
    sha256_state,
)

__all__ = [
    "BACKBONES",
    "INFLATED",
    "Backbone",
    "StateDict",
    "Weights",
    "architecture",
    "backbone",
    "build_2d",
    "build_network",
    "check_state_keys",
    "imagenet_available",
    "imagenet_cache_path",
    "load_weights",
    "random_weights",
    "sha256_state",
]


def _densenet_trunk(model: nn.Module) -> nn.Sequential:
    if not isinstance(model, models.DenseNet):
        raise ModelError(f"expected a torchvision DenseNet, got {type(model).__name__}")
    return nn.Sequential(OrderedDict(features=model.features))


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet_trunk(model: nn.Module) -> nn.Sequential:
    if not isinstance(model, models.ResNet):
        raise ModelError(f"expected a torchvision ResNet, got {type(model).__name__}")
    children = dict(model.named_children())
    return nn.Sequential(OrderedDict((name, children[name]) for name in _RESNET_TRUNK))


_LEGACY_DENSE_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")


def _densenet_keys(state: StateDict) -> StateDict:
    """Old DenseNet checkpoints name ``norm.1``; torchvision's modules say ``norm1``."""
    return {_LEGACY_DENSE_KEY.sub(r"\1\2.", key): value for key, value in state.items()}


def _same_keys(state: StateDict) -> StateDict:
    return dict(state)


@dataclass(frozen=True)
class Backbone:
    """One registered 2D backbone and how to make it 3D."""

    build2d: Callable[[], nn.Module]  # torchvision constructor without weights
    imagenet: WeightsEnum  # torchvision's ImageNet weights entry
    stem: str  # module path of the first conv, whose RGB kernels are summed
    trunk: Callable[[nn.Module], nn.Sequential]  # the inflated part, same module paths
    dropped: tuple[str, ...]  # 2D key prefixes left out by design (classifier)
    fix_keys: Callable[[StateDict], StateDict] = _same_keys  # legacy key names


INFLATED: dict[str, Backbone] = {
    "densenet121": Backbone(
        models.densenet121,
        models.DenseNet121_Weights.IMAGENET1K_V1,
        "features.conv0",
        _densenet_trunk,
        ("classifier.",),
        _densenet_keys,
    ),
    "densenet169": Backbone(
        models.densenet169,
        models.DenseNet169_Weights.IMAGENET1K_V1,
        "features.conv0",
        _densenet_trunk,
        ("classifier.",),
        _densenet_keys,
    ),
    "densenet201": Backbone(
        models.densenet201,
        models.DenseNet201_Weights.IMAGENET1K_V1,
        "features.conv0",
        _densenet_trunk,
        ("classifier.",),
        _densenet_keys,
    ),
    "resnet18": Backbone(
        models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, "conv1", _resnet_trunk, ("fc.",)
    ),
    "resnet50": Backbone(
        models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, "conv1", _resnet_trunk, ("fc.",)
    ),
}
# every backbone by name: inflated ones and 3D ones pretrained on CT
BACKBONES: dict[str, Backbone | Native] = {**INFLATED, **NATIVE}


def backbone(name: str) -> Backbone:
    """The registry entry of an inflated backbone."""
    try:
        return INFLATED[name]
    except KeyError:
        kind = " (a 3D backbone: it is not inflated)" if name in NATIVE else ""
        raise ModelError(
            f"unknown inflated backbone {name!r}{kind}; choose one of {', '.join(sorted(INFLATED))}"
        ) from None


def architecture(name: str) -> str:
    """Which library and version defines backbone ``name``'s network (for run.json)."""
    if name in NATIVE:
        return native_architecture(name)
    import torchvision

    return f"torchvision {torchvision.__version__} models.{name}, inflated to 3D"


def imagenet_cache_path(name: str) -> Path:
    """Where torchvision's weights API keeps this backbone's ImageNet file."""
    url = backbone(name).imagenet.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def imagenet_available(name: str) -> bool:
    return imagenet_cache_path(name).is_file()


def random_weights(name: str, seed: int) -> Weights:
    """torchvision's own initialisation under a fixed seed (global RNG untouched); for a
    3D backbone, its library's."""
    if name in NATIVE:
        return random_native(name, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v.detach().clone() for k, v in backbone(name).build2d().state_dict().items()}
    return Weights(state, "random", f"torchvision init, seed {seed}", sha256_state(state))


def _read_state_file(path: Path) -> StateDict:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"cannot read weights file {path}: {type(err).__name__}: {err}; "
            "it must be a torchvision state dict saved with torch.save(model.state_dict(), PATH)"
        ) from err
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise WeightsError(
            f"weights file {path} does not hold a state dict (str -> tensor); "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return dict(loaded)


def _imagenet_weights(name: str, download: bool) -> Weights:
    entry = backbone(name).imagenet
    cache = imagenet_cache_path(name)
    path = cached_or_downloaded(
        cache, entry.url, lambda why: _missing_imagenet(name, cache, why), download=download
    )
    digest = sha256_file(path)
    # torchvision names its files <arch>-<first hex digits of the sha256>.pth
    match = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsError(
            f"ImageNet weights file {path} is corrupt: its sha256 is {digest}, expected one "
            f"starting with {match.group(1)}; delete the file and download it again"
        )
    detail = f"torchvision {type(entry).__name__}.{entry.name} from {path}"
    return Weights(_read_state_file(path), "imagenet", detail, digest)


def _missing_imagenet(name: str, path: Path, why: str) -> str:
    url = backbone(name).imagenet.url
    return (
        f"ImageNet weights for {name} are not in torchvision's cache ({path}) and could not be "
        f"downloaded ({why}). Download {url} on a machine with internet and put the file at "
        f"{path} (or point TORCH_HOME at a cache that has it), or pass --weights PATH to a "
        "state dict, or --weights random for a run without pretrained knowledge"
    )


def load_weights(cfg: ModelConfig, *, download: bool = True) -> Weights:
    """Resolve ``cfg.weights`` ("imagenet", "random" or PATH) to a checked 2D state dict;
    for a 3D backbone ("pretrained", "random" or PATH), to its checked state dict."""
    if cfg.backbone in NATIVE:
        return load_native(cfg, download=download)
    if cfg.weights == "random":
        weights = random_weights(cfg.backbone, cfg.seed)
    elif cfg.weights == "imagenet":
        weights = _imagenet_weights(cfg.backbone, download)
    else:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; pass --weights imagenet, random or "
                "the path of a torchvision state dict"
            )
        digest = sha256_file(path)
        weights = Weights(_read_state_file(path), str(path), f"state dict file {path}", digest)
    if cfg.weights_sha256 is not None and weights.sha256 != cfg.weights_sha256.lower():
        raise WeightsError(
            f"weights {weights.detail} have sha256 {weights.sha256}, expected "
            f"{cfg.weights_sha256.lower()}; the file changed or is the wrong one"
        )
    spec = backbone(cfg.backbone)
    fixed = spec.fix_keys(weights.state_dict)
    check_state_keys(cfg.backbone, fixed, weights.detail)
    dropped = tuple(sorted(key for key in fixed if key.startswith(spec.dropped)))
    return Weights(fixed, weights.source, weights.detail, weights.sha256, dropped)


def check_state_keys(
    name: str,
    state: Mapping[str, torch.Tensor],
    origin: str,
    model2d: nn.Module | None = None,
) -> None:
    """A state dict must have exactly the 2D model's keys with the same shapes."""
    reference = model2d if model2d is not None else backbone(name).build2d()
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    check_fit(name, state, expected, origin, f"use a state dict of torchvision's {name}")


def _sum_stem(trunk: nn.Module, path: str) -> None:
    """Replace the RGB stem conv by a 1-channel conv whose kernel is the RGB sum.

    Feeding a gray volume to the summed kernel equals feeding the gray volume
    copied into three channels to the original kernel (convolution is linear).
    """
    parent_path, _, name = path.rpartition(".")
    parent = trunk.get_submodule(parent_path) if parent_path else trunk
    old = trunk.get_submodule(path)
    if not isinstance(old, nn.Conv2d) or old.in_channels != 3:
        raise ModelError(f"stem {path!r} is not a 3-channel Conv2d; cannot make it 1-channel")
    new = nn.Conv2d(
        1,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, name, new)


def build_2d(name: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The torchvision 2D model with ``state`` loaded, in eval mode.

    Built on the meta device (torchvision's random initialisation would be
    overwritten anyway) and given copies of ``state``'s tensors in the dtype a
    fresh model holds; a model that keeps a tensor outside its state dict is
    built the usual way.
    """
    with torch.device("meta"):
        model = backbone(name).build2d()
    check_state_keys(name, state, "given", model)
    empty = model.state_dict()
    model.load_state_dict(
        {k: v.detach().to(empty[k].dtype, copy=True) for k, v in state.items()},
        strict=True,
        assign=True,
    )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = backbone(name).build2d()
        model.load_state_dict(dict(state), strict=True)
    return model.eval()


def build_network(
    name: str,
    state: Mapping[str, torch.Tensor],
    inflation: Inflation = "mean",
    *,
    gray_stem: bool = True,
    factorised: bool = True,
) -> tuple[nn.Module, TransferReport]:
    """Inflate backbone ``name`` with 2D weights ``state`` into a 3D network in eval mode;
    a 3D backbone (:mod:`cohort.model.native`) is built with ``state`` as it is.

    Input is (N, 1, D, H, W) with ``gray_stem`` (RGB stem kernels summed), else
    (N, 3, D, H, W). With ``factorised`` (the default) inflated convolutions and
    max pooling run depth-factorised (:mod:`cohort.model.factorise`): the same
    values for about half the work. Returns the network and the transfer
    report; raises if any 2D tensor outside the classifier is not carried over.
    """
    if name in NATIVE:
        return build_native(name, state)
    spec = backbone(name)
    model2d = build_2d(name, state)
    trunk = spec.trunk(model2d)
    trunk_keys = set(trunk.state_dict())
    report = TransferReport()
    for key in model2d.state_dict():
        if key in trunk_keys:
            continue
        if not key.startswith(spec.dropped):
            raise ModelError(
                f"2D tensor {key!r} of {name} is neither in the inflated trunk nor in the "
                f"classifier ({', '.join(spec.dropped)}); the trunk definition is incomplete"
            )
        report.drop(key, "classifier: not used for feature extraction")
    if gray_stem:
        _sum_stem(trunk, spec.stem)
    network, inflated = inflate(trunk, inflation)
    report.transferred.update(inflated.transferred)
    if gray_stem:
        report.note(f"{spec.stem}.weight", "RGB kernels summed to 1 channel, then inflated")
    if factorised:
        factorise(network)
    return network.eval(), report
