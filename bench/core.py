"""The model alone: cohort's core functions in a plain loop on pre-loaded tensors.

No Ray, no I/O inside the timed loops. Besides the package's own
:func:`cohort.model.pooling.extract`, this module holds the optimisation candidates
the bench measures, each built only from the package's pure functions so the
result can be checked against ``extract``:

* :func:`extract_regions_batched`: ``masked-input`` with all regions of a
  subject in one forward pass (batch = regions) instead of one pass each;
* :func:`extract_subjects_batched`: ``masked-pool`` with several same-shape
  subjects in one forward pass;
* ``channels_last_3d`` memory format of network and input (:func:`extractor`);
* the network without depth factorisation (plain ``Conv3d``/``MaxPool3d``), to
  measure what :mod:`cohort.model.factorise` gains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cohort.config import DEFAULT_LABELS, PoolingConfig, PreprocessConfig
from cohort.inputs.geometry import check_pair
from cohort.inputs.manifest import read_manifest
from cohort.inputs.preprocess import air_value, preprocess_pair
from cohort.inputs.readers import load_pair
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.network import build_network
from cohort.model.pooling import (
    RegionVector,
    air_outside,
    check_coverage,
    extract,
    global_mean,
    masked_mean,
    region_weights,
)

LAYERS = ("conv-1", "conv-3", "conv-5")


@dataclass(frozen=True)
class Loaded:
    """One subject ready for the model, as tensors."""

    subject_id: str
    image: torch.Tensor  # (D, H, W) float32, normalised
    index: torch.Tensor  # (D, H, W) uint8 region index
    names: tuple[str, ...]


@dataclass(frozen=True)
class LoadTimes:
    decode_s: float  # NIfTI read + gzip decode (load_pair), all subjects
    check_s: float  # grid and label checks
    preprocess_s: float  # reorient, window, regions
    voxels: int  # per subject


def load_all(
    manifest: Path, cfg: PreprocessConfig, limit: int | None = None
) -> tuple[list[Loaded], LoadTimes]:
    """Load, check and preprocess the first ``limit`` subjects, timing each stage."""
    subjects = read_manifest(manifest)[:limit]
    loaded: list[Loaded] = []
    decode = check = prep = 0.0
    voxels = 0
    for subject in subjects:
        labels = subject.labels or DEFAULT_LABELS
        t0 = time.perf_counter()
        pair = load_pair(subject.image, subject.mask, cfg)
        t1 = time.perf_counter()
        check_pair(pair, labels, cfg)
        t2 = time.perf_counter()
        prepared = preprocess_pair(pair, labels, True, cfg)
        t3 = time.perf_counter()
        decode, check, prep = decode + t1 - t0, check + t2 - t1, prep + t3 - t2
        voxels = int(prepared.image.size)
        loaded.append(
            Loaded(
                subject.subject_id,
                torch.from_numpy(np.ascontiguousarray(prepared.image)),
                torch.from_numpy(np.ascontiguousarray(prepared.region_index)),
                prepared.region_names,
            )
        )
    return loaded, LoadTimes(decode, check, prep, voxels)


def extractor(
    state: dict[str, torch.Tensor],
    *,
    gray_stem: bool = True,
    stop_early: bool = True,
    channels_last: bool = False,
    factorised: bool = True,
) -> FeatureExtractor:
    """cohort's DenseNet121 hooked at conv-1/3/5, optionally in channels_last_3d."""
    network, _ = build_network("densenet121", state, gray_stem=gray_stem, factorised=factorised)
    layers = resolve_layers(network, LAYERS, in_channels=1 if gray_stem else 3)
    if channels_last:
        network = network.to(memory_format=torch.channels_last_3d)
    return FeatureExtractor(network, layers, stop_early=stop_early)


def _input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


def extract_regions_batched(
    ex: FeatureExtractor,
    image: torch.Tensor,
    index: torch.Tensor,
    names: Sequence[str],
    air: float,
    *,
    channels_last: bool = False,
) -> list[RegionVector]:
    """``masked-input`` with every region in one forward pass (batch = regions)."""
    with torch.inference_mode():
        batch = torch.stack([air_outside(image, index, r, air) for r in range(len(names))])
        maps = ex(_input(batch[:, None], channels_last))
        pooled = {info.layer: global_mean(maps[info.layer]) for info in ex.layers}
    return [
        RegionVector(name, info.layer, info.module_path, pooled[info.layer][r].numpy())
        for r, name in enumerate(names)
        for info in ex.layers
    ]


def extract_subjects_batched(
    ex: FeatureExtractor,
    subjects: Sequence[Loaded],
    cfg: PoolingConfig,
    *,
    channels_last: bool = False,
) -> list[list[RegionVector]]:
    """``masked-pool`` for several same-shape subjects in one forward pass."""
    out: list[list[RegionVector]] = []
    with torch.inference_mode():
        batch = torch.stack([s.image for s in subjects])[:, None]
        maps = ex(_input(batch, channels_last))
        for b, subject in enumerate(subjects):
            pooled = {}
            for info in ex.layers:
                fmap = maps[info.layer][b]
                grid = (fmap.shape[1], fmap.shape[2], fmap.shape[3])
                weights = region_weights(subject.index, len(subject.names), grid)
                check_coverage(weights, subject.names, info.layer, cfg.min_coverage)
                pooled[info.layer] = masked_mean(fmap, weights)
            out.append(
                [
                    RegionVector(name, info.layer, info.module_path, pooled[info.layer][r].numpy())
                    for r, name in enumerate(subject.names)
                    for info in ex.layers
                ]
            )
    return out


Variant = str  # a key of VARIANTS
VARIANTS: dict[str, str] = {
    "masked-pool": "extract(), one forward per subject",
    "masked-pool/batch2": "two same-shape subjects per forward",
    "masked-pool/cl3d": "extract() with channels_last_3d",
    "masked-pool/plain3d": "extract(), plain Conv3d/MaxPool3d (not factorised)",
    "masked-input": "extract(), one forward per region",
    "masked-input/regions": "all regions of a subject in one forward",
    "masked-input/regions+cl3d": "regions batched, channels_last_3d",
}


def run_variant(
    variant: Variant, ex: FeatureExtractor, loaded: Sequence[Loaded]
) -> tuple[float, list[list[RegionVector]]]:
    """Seconds for all of ``loaded`` and the vectors, with ``ex`` built for the variant."""
    air = air_value(PreprocessConfig())
    channels_last = variant.endswith("cl3d")
    out: list[list[RegionVector]] = []
    started = time.perf_counter()
    if variant in ("masked-pool", "masked-pool/cl3d", "masked-pool/plain3d", "masked-input"):
        cfg = PoolingConfig(mode="masked-input" if variant == "masked-input" else "masked-pool")
        for s in loaded:
            out.append(extract(ex, s.image, s.index, s.names, cfg, air))
    elif variant == "masked-pool/batch2":
        for i in range(0, len(loaded), 2):
            out.extend(extract_subjects_batched(ex, loaded[i : i + 2], PoolingConfig()))
    elif variant.startswith("masked-input/regions"):
        for s in loaded:
            out.append(
                extract_regions_batched(
                    ex, s.image, s.index, s.names, air, channels_last=channels_last
                )
            )
    else:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return time.perf_counter() - started, out


def interleaved(
    state: dict[str, torch.Tensor], shape: tuple[int, int, int], rounds: int
) -> dict[str, list[float]]:
    """Seconds per volume of the forward variants, interleaved round by round.

    On a shared, noisy machine one variant run after another mostly measures
    the neighbours; alternating them each round lets the medians be compared.
    """
    from bench.baseline import Baseline

    plain = Baseline.build("random", 0)
    ex = extractor(state)
    one, three = torch.randn(1, 1, *shape), torch.randn(3, 1, *shape)

    def timed(fn: Callable[[], object], per: int = 1) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            fn()
        return (time.perf_counter() - started) / per

    unfactorised = extractor(state, factorised=False)
    variants: dict[str, Callable[[], float]] = {
        "plain 3-ch whole trunk, batch 1": lambda: timed(lambda: plain.pooled(one[0, 0])),
        "cohort 1-ch stop, batch 1": lambda: timed(lambda: ex(one)),
        "cohort 1-ch stop, not factorised": lambda: timed(lambda: unfactorised(one)),
        "cohort 1-ch stop, batch 3 (per volume)": lambda: timed(lambda: ex(three), 3),
    }
    ex_cl = extractor(state, channels_last=True)
    one_cl = one.contiguous(memory_format=torch.channels_last_3d)
    variants["cohort 1-ch stop, batch 1, channels_last_3d"] = lambda: timed(lambda: ex_cl(one_cl))
    for run in variants.values():  # warm-up: oneDNN builds its kernels per shape
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            seconds[name].append(run())
    return seconds


def max_difference(
    a: Sequence[Sequence[RegionVector]], b: Sequence[Sequence[RegionVector]]
) -> float:
    """Largest |a - b| relative to the largest |a| over all vectors of two runs."""
    worst, scale = 0.0, 0.0
    for va, vb in zip(a, b, strict=True):
        for x, y in zip(va, vb, strict=True):
            worst = max(worst, float(np.max(np.abs(x.vector - y.vector))))
            scale = max(scale, float(np.max(np.abs(x.vector))))
    return worst / scale if scale > 0 else worst
