"""The plain approach: the origin study's protocol as a single-process loop.

Written on purpose without the ``cohort`` package, as a user would write it:
torchvision's DenseNet121, inflated to 3D here (I3D mean inflation), the gray
volume copied into 3 channels, the whole volume, fp32, one forward pass of the
whole trunk per region with every voxel outside the region set to air, global
average pooling of the last, 3rd-last and 5th-last convolutions, cosine
similarity of every region pair.

The only things shared with ``cohort`` are the inputs (NIfTI files), the
weights (torchvision's init under the same seed, or ImageNet) and the
preprocessing constants of the numerical contract, restated below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torchvision import models

HU_LOW, HU_HIGH = -1000.0, 2000.0  # HU window; the low end is air
GRAY_MEAN, GRAY_STD = 0.449, 0.226  # gray ImageNet statistics
CONV_FROM_END = (1, 3, 5)  # last, 3rd-last, 5th-last convolution
LAYER_IDS = ("conv-1", "conv-3", "conv-5")


def densenet121_2d(weights: str, seed: int) -> nn.Module:
    """torchvision's DenseNet121: seeded init ("random") or ImageNet ("imagenet", cached)."""
    if weights == "imagenet":
        return models.densenet121(weights=models.DenseNet121_Weights.IMAGENET1K_V1).eval()
    if weights != "random":
        raise ValueError(f"weights must be 'random' or 'imagenet', got {weights!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.densenet121().eval()


def _to_3d(layer: nn.Module) -> nn.Module | None:
    """The 3D twin of a 2D layer, or None for containers and parameter-free layers."""
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0]
        conv = nn.Conv3d(
            layer.in_channels,
            layer.out_channels,
            (k, *layer.kernel_size),  # type: ignore[arg-type]
            stride=(layer.stride[0], *layer.stride),  # type: ignore[arg-type]
            padding=(layer.padding[0], *layer.padding),
            bias=layer.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(layer.weight.unsqueeze(2).repeat(1, 1, k, 1, 1) / k)
            if layer.bias is not None and conv.bias is not None:
                conv.bias.copy_(layer.bias)
        return conv
    if isinstance(layer, nn.BatchNorm2d):
        bn = nn.BatchNorm3d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        bn.load_state_dict(layer.state_dict())
        return bn
    if isinstance(layer, nn.MaxPool2d):
        return nn.MaxPool3d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, nn.AvgPool2d):
        return nn.AvgPool3d(layer.kernel_size, layer.stride, layer.padding)  # type: ignore[arg-type]
    return None


def inflate(module: nn.Module) -> nn.Module:
    """Replace every 2D layer of ``module`` by its 3D twin, in place."""
    for name, child in module.named_children():
        twin = _to_3d(child)
        if twin is None:
            inflate(child)
        else:
            setattr(module, name, twin)
    return module


@dataclass
class Baseline:
    """The inflated 3-channel trunk and the convolutions it hooks."""

    trunk: nn.Module
    hooked: tuple[nn.Module, ...]  # in LAYER_IDS order

    @classmethod
    def build(cls, weights: str = "random", seed: int = 0) -> Baseline:
        features = densenet121_2d(weights, seed).features
        if not isinstance(features, nn.Module):
            raise TypeError("torchvision's DenseNet has no features module")
        trunk = inflate(features).eval()
        convs = [m for m in trunk.modules() if isinstance(m, nn.Conv3d)]
        return cls(trunk, tuple(convs[-k] for k in CONV_FROM_END))

    def pooled(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """GAP vectors (float64) of the hooked layers for one (D, H, W) normalised volume."""
        captured: dict[int, torch.Tensor] = {}

        def keep(k: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
            def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
                captured[k] = output

            return hook

        handles = [m.register_forward_hook(keep(k)) for k, m in enumerate(self.hooked)]
        try:
            with torch.inference_mode():
                self.trunk(volume[None, None].repeat(1, 3, 1, 1, 1))  # gray copied into 3 channels
        finally:
            for handle in handles:
                handle.remove()
        return [captured[k][0].double().mean(dim=(1, 2, 3)) for k in range(len(self.hooked))]


def read_subject(image: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU image and label mask as (D, H, W) = (superior, anterior, right) arrays."""
    img = nib.as_closest_canonical(nib.load(image))
    seg = nib.as_closest_canonical(nib.load(mask))
    hu = np.asarray(img.get_fdata(dtype=np.float32)).transpose(2, 1, 0)
    labels = np.rint(np.asarray(seg.get_fdata(dtype=np.float32))).astype(np.int64)
    return hu, labels.transpose(2, 1, 0)


def normalise(hu: np.ndarray) -> np.ndarray:
    scaled = (np.clip(hu, HU_LOW, HU_HIGH) - HU_LOW) / (HU_HIGH - HU_LOW)
    return ((scaled - GRAY_MEAN) / GRAY_STD).astype(np.float32)


def subject_cosines(
    model: Baseline, hu: np.ndarray, labels: np.ndarray, named: Sequence[tuple[str, int]]
) -> dict[tuple[str, str, str], float]:
    """{(layer, region_a, region_b): cosine} for one subject (named labels + background)."""
    masks = [(name, labels == value) for name, value in named]
    masks.append(("background", ~np.isin(labels, [value for _, value in named])))
    vectors: dict[str, list[torch.Tensor]] = {}
    for name, inside in masks:
        volume = normalise(np.where(inside, hu, HU_LOW))  # air outside the region
        vectors[name] = model.pooled(torch.from_numpy(volume))
    out: dict[tuple[str, str, str], float] = {}
    names = [name for name, _ in masks]
    for k, layer in enumerate(LAYER_IDS):
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                va, vb = vectors[a][k], vectors[b][k]
                out[(layer, a, b)] = float(va @ vb / (va.norm() * vb.norm()))
    return out


@dataclass(frozen=True)
class BaselineResult:
    seconds: float  # wall time of the loop (reading included, model build excluded)
    cosines: dict[str, dict[tuple[str, str, str], float]]  # subject -> (layer, a, b) -> cosine


def run_baseline(
    subjects: Sequence[tuple[str, Path, Path]],
    named: Sequence[tuple[str, int]] = (("tibia", 1), ("femur", 2)),
    weights: str = "random",
    seed: int = 0,
) -> BaselineResult:
    """The plain loop over ``(subject_id, image, mask)``."""
    model = Baseline.build(weights, seed)
    cosines: dict[str, dict[tuple[str, str, str], float]] = {}
    started = time.perf_counter()
    for subject_id, image, mask in subjects:
        hu, labels = read_subject(image, mask)
        cosines[subject_id] = subject_cosines(model, hu, labels, named)
    return BaselineResult(time.perf_counter() - started, cosines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.baseline MANIFEST.csv``: the whole plain loop as one process, as a
    user would run it (importing torch, building the model, looping); prints the time."""
    import csv
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    manifest = Path(args[0])
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    subjects = [
        (r["subject_id"], manifest.parent / r["image"], manifest.parent / r["mask"]) for r in rows
    ]
    result = run_baseline(subjects)
    print(f"baseline: {len(subjects)} subjects, loop {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
