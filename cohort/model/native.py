"""3D backbones pretrained on CT: their registry, their weights, their networks.

Each entry says which library module builds the architecture, which file its
authors publish, how the published key names map to the module's (prefixes
that the file adds) and which published tensors feature extraction leaves
out (heads, dropped by name and listed in ``run.json``). Loading is strict:
after the mapping, the state dict must hold every tensor of the network with
its shape and nothing else; ``num_batches_tracked`` (a BatchNorm counter that
eval mode never reads, absent from checkpoints older than PyTorch 0.4.1) is
the one tensor that may be missing, and is then set to 0, as PyTorch's own
loader does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from cohort.config import ModelConfig
from cohort.errors import ModelError, WeightsError
from cohort.inputs.fingerprint import sha256_file
from cohort.model import ctfm, medicalnet
from cohort.model.inflate import TransferReport
from cohort.model.weights import (
    Published,
    StateDict,
    Weights,
    check_fit,
    fetch,
    read_state_file,
    sha256_state,
    strip_prefix,
)

__all__ = [
    "NATIVE",
    "Native",
    "architecture",
    "build_native",
    "check_native_keys",
    "load_native",
    "native",
    "random_native",
]

_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class Native:
    """One registered 3D backbone."""

    build: Callable[[], nn.Module]  # the library's module with the published settings
    library: str  # the module that defines the architecture (README, run.json)
    published: Published  # the pretrained file (--weights pretrained)
    prefixes: tuple[str, ...] = ()  # key prefixes a published file adds (stripped when all have it)
    heads: tuple[str, ...] = ()  # published key prefixes not used for features (dropped by name)


def _medicalnet(depth: int) -> Native:
    return Native(
        partial(medicalnet.build, depth),
        f"monai.networks.nets.resnet{depth} (MedicalNet settings; layer3/layer4 dilated 2/4)",
        medicalnet.published(depth),
        (medicalnet.PREFIX,),
        medicalnet.HEAD,
    )


NATIVE: dict[str, Native] = {
    "medicalnet-resnet10": _medicalnet(10),
    "medicalnet-resnet18": _medicalnet(18),
    "medicalnet-resnet34": _medicalnet(34),
    "medicalnet-resnet50": _medicalnet(50),
    "ct-fm": Native(
        ctfm.build,
        "monai.networks.nets.segresnet_ds.SegResEncoder (CT-FM's config.json)",
        ctfm.PUBLISHED,
    ),
}


def native(name: str) -> Native:
    """The entry of the 3D backbone ``name``; a ModelError names the ones there are."""
    if name not in NATIVE:
        known = ", ".join(sorted(NATIVE))
        raise ModelError(f"{name!r} is not a 3D backbone pretrained on CT; choose one of {known}")
    return NATIVE[name]


def architecture(name: str) -> str:
    """Which library and version defines backbone ``name``'s network."""
    import monai

    return f"MONAI {monai.__version__} {native(name).library}"


def _reference(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        network = native(name).build()
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def random_native(name: str, seed: int) -> Weights:
    """MONAI's initialisation of the network under a fixed seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {k: v.detach().clone() for k, v in native(name).build().state_dict().items()}
    detail = f"{architecture(name)} init, seed {seed}"
    return Weights(state, "random", detail, sha256_state(state))


def _published_keys(name: str, state: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """The published names mapped to the module's: prefixes stripped, heads dropped."""
    spec = native(name)
    mapped = dict(state)
    for prefix in spec.prefixes:
        mapped = strip_prefix(mapped, prefix)
    dropped = sorted(key for key in mapped if spec.heads and key.startswith(spec.heads))
    kept = {key: value for key, value in mapped.items() if key not in dropped}
    return kept, dropped


def check_native_keys(name: str, state: Mapping[str, torch.Tensor], origin: str) -> StateDict:
    """``state`` (module names) holds exactly the network's tensors with their shapes;
    a missing BatchNorm counter is filled with 0. Returns the complete state dict."""
    expected = _reference(name)
    filled = dict(state)
    for key in expected:
        if key.endswith(_COUNTER) and key not in filled:
            filled[key] = torch.tensor(0, dtype=torch.long)
    check_fit(
        name,
        filled,
        expected,
        origin,
        f"use {name}'s published file ({native(name).published.filename}) or a state dict "
        "of the same network",
        unit="tensors",
    )
    return filled


def load_native(cfg: ModelConfig, *, download: bool = True) -> Weights:
    """Resolve ``cfg.weights`` ("pretrained", "random" or PATH) for a 3D backbone."""
    spec = native(cfg.backbone)
    if cfg.weights == "random":
        weights = random_native(cfg.backbone, cfg.seed)
    else:
        if cfg.weights == "pretrained":
            path = fetch(spec.published, cfg.backbone, download=download)
            source = "pretrained"
            detail = (
                f"{spec.published.filename} from {spec.published.url} "
                f"(licence {spec.published.licence}), cached at {path}"
            )
        else:
            path = Path(cfg.weights).expanduser()
            if not path.is_file():
                raise WeightsError(
                    f"weights file {path} does not exist; pass --weights pretrained, random "
                    f"or the path of {cfg.backbone}'s weights ({spec.published.filename})"
                )
            source, detail = str(path), f"weights file {path}"
        fits = f"{cfg.backbone}'s weights (as in {spec.published.filename})"
        state, dropped = _published_keys(cfg.backbone, read_state_file(path, fits))
        weights = Weights(state, source, detail, sha256_file(path), tuple(dropped))
    if cfg.weights_sha256 is not None and weights.sha256 != cfg.weights_sha256.lower():
        raise WeightsError(
            f"weights {weights.detail} have sha256 {weights.sha256}, expected "
            f"{cfg.weights_sha256.lower()}; the file changed or is the wrong one"
        )
    state = check_native_keys(cfg.backbone, weights.state_dict, weights.detail)
    return Weights(state, weights.source, weights.detail, weights.sha256, weights.dropped)


def build_native(name: str, state: Mapping[str, torch.Tensor]) -> tuple[nn.Module, TransferReport]:
    """Backbone ``name`` with ``state`` (module names) loaded strictly, in eval mode."""
    full = check_native_keys(name, state, "given")
    network = native(name).build()
    network.load_state_dict(full, strict=True)
    report = TransferReport()
    for key in full:
        report.note(key, "loaded as published")
    return network.eval(), report
