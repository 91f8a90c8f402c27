"""How much memory one subject needs in a feature actor, from its model input's shape.

Pure arithmetic on shapes and typed config (no torch): the loaders, which do not
import the model stack, check every subject with it at the ``check`` stage, so
that a subject too large for its worker fails there, with the numbers and the
fixes, instead of having its worker killed.

**What is estimated** (:class:`Estimate`), in bytes, for a model input of
``(D, H, W)`` voxels:

- ``forward``: the most tensor memory live during the actor's call
  (:func:`cohort.model.pooling.extract`: the forward pass up to the deepest
  hooked layer, and the pooling), as the torch allocator counts it, relative
  to the start of the call. Calibrated by measurement (below).
- ``inputs``: the hand-over (:mod:`cohort.inputs.handover`) as the actor
  receives it: HU at 2 bytes per voxel (int16; 4 where it is float32) and 1
  byte per region-index plane; with ``--spacing`` the HU is the stored
  image's window, resampled in the actor. Counted once on the CPU (the
  actor reads it where Ray put it); on CUDA the actor's host holds it and a
  pinned copy, and the GPU a third.
- ``image``: the float32 model input the actor makes (4 bytes per voxel),
  live through the forward pass.
- ``prepare``: the most tensor memory live while the actor makes that input
  (:mod:`cohort.model.intensity`): the resampling's float64 passes, the
  normalisation's copy and the foreground statistics' slab
  (:func:`cohort.model.preparation.prepare_bytes`); the call's peak is the
  larger of this and ``image`` plus ``forward``.
- ``weights``: the network's parameters and buffers as built (measured per
  backbone; on CUDA on the GPU).

**What is not**: the worker process itself (Python, torch, Ray's core worker,
the imported libraries): :data:`WORKER_BASE_BYTES`, a stated constant, subtracted
from ``--actor-memory`` before the comparison. It is what a working feature actor
holds beyond this estimate: its peak unique memory in real runs less the
estimate was 602-933 MiB from 96 x 128 x 128 to 512 x 512 x 216 (five runs,
``python -m bench.actor_peak``, development machine: torch 2.14.1, Ray 2.60),
where an idle actor with DenseNet121 built holds 0.51 GB; the constant is the
most of those, rounded up. Allocator caching and fragmentation, cuDNN
workspaces, and the Ray object store's shared memory (the block the hand-over
comes in) are not modelled either.

**The forward pass's model.** Per backbone, per stage of the network (stem,
dense blocks / ResNet layers / CT-FM levels), the bytes per input voxel live
while that stage runs; the pass's peak is the largest over the stages up to
the deepest hooked layer (the pass stops there). For the plain forward pass
(MedicalNet's ResNets, CT-FM) that is the whole model: every map scales with
the volume. The lean pass (the inflated DenseNets and ResNets,
:mod:`cohort.model.lean`) streams its first stages over depth chunks of
:data:`CHUNK_VOXELS` input voxels, so they cost ``66 B x`` the voxels of one
chunk and its halo (the whole volume when it is one chunk), plus their output
kept for the whole volume; the first full-size dense block holds its buffer
(fixed bytes per voxel) and its bottleneck in depth pieces (bytes per voxel
times the share of the depth one piece holds). bytes/voxel therefore falls
with depth: 66 at 96 x 128 x 128, ~17 at 512 x 512 x 216, ~5.3 at x 1000.

Pooling adds its own phase (``pooling``); ``masked-input`` runs one pass per
region with a masked copy of the input (4 B/voxel) and the previous region's
maps live. Hooked layers shallower than the calibration's (conv-1/3/5) keep
their maps (channels x 4 B / stride^3 per input voxel, the stage's widest).
``bf16`` (CUDA autocast) halves the activations and adds the input's bf16
copy; CUDA fp32 is taken to equal the CPU's figures. Neither is measured here
(no GPU): ``bench/memory_estimate.py --device cuda`` measures them.

**Calibration.** ``python -m bench.memory_estimate`` (``--calibrate`` prints
every backbone's figures per stage): CPU, torch 2.14.1, seeded random
weights, three regions, peak from the torch profiler's allocation events
(:func:`bench.memory.measure`); the stage figures at 96 x 128 x 128 and
128 x 192 x 192 (rounded; where the two differ, mostly the larger), the lean
pass's halo and dense-block pieces from chunked runs and the full-size runs
of ``bench/SCALING.md`` (512 x 512 x 216 / 648 / 1000). Accuracy measured:
``bench/SCALING.md``, "Memory estimate". Not modelled, because they cost
megabytes, not gigabytes: volumes small enough that torch picks its im2col
convolution over oneDNN (MedicalNet's layers below about 64 x 128 x 128) need
up to twice the plain backbones' figure, and DenseNets on volumes of under
about 48 slices of at most 80 x 80 peak in dense block 1 at ~99 B/voxel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cohort.config import PoolingMode, Precision, RunConfig
from cohort.errors import GeometryError
from cohort.model.preparation import IMAGE_BPV, prepare_bytes

__all__ = [
    "CHUNK_VOXELS",
    "GIB",
    "MIN_PIECE_VOXELS",
    "PROFILES",
    "WORKER_BASE_BYTES",
    "Budget",
    "Estimate",
    "Profile",
    "actor_budget",
    "check_memory",
    "estimate_peak_bytes",
    "stage_of",
]

GIB = 2**30  # --actor-memory counts GB of 2^30 bytes, as Ray's memory resource is set
CHUNK_VOXELS = 1 << 23  # = cohort.model.lean.DEFAULT_CHUNK_VOXELS (a test checks)
MIN_PIECE_VOXELS = 1 << 16  # = cohort.model.lean.MIN_PIECE_VOXELS (a test checks)
WORKER_BASE_BYTES = GIB  # the worker process, not modelled (see the module docstring)
_MASKED_INPUT_BPV = 4.0  # masked-input: the input with air outside the region, float32
_BF16_INPUT_BPV = 2.0  # bf16 autocast: the first convolution's bf16 copy of the input

Shape = tuple[int, int, int]

_STEM = {"conv0", "norm0", "relu0", "pool0", "conv1", "bn1", "relu", "act", "maxpool", "conv_init"}


def stage_of(path: str) -> str:
    """The stage of a module path: ``stem``, ``denseblock2``, ``layer3``, ``layers.4``, ..."""
    parts = path.split(".")
    if parts[0] == "features" and len(parts) > 1:
        parts = parts[1:]
    if parts[0] in _STEM:
        return "stem"
    if parts[0] == "layers" and len(parts) > 1:  # CT-FM's levels
        return f"layers.{parts[1]}"
    return parts[0]


@dataclass(frozen=True)
class Stage:
    """One stage of a network, in execution order."""

    name: str
    stride: int  # input voxels per cell of its maps, along each axis
    channels: int  # its widest map's channels (sizes a hooked map)
    peak: float  # bytes per input voxel live while it runs
    piece: float = 0.0  # plus this times the share of its input's depth one piece holds (lean)
    piece_stride: int = 0  # the stride of that input (0: ``stride``)


@dataclass(frozen=True)
class Streamed:
    """The lean pass's depth-streamed first stages (:mod:`cohort.model.lean`)."""

    stages: int  # how many of the first stages it covers
    per_voxel: float  # bytes per voxel of a chunk (the whole volume when it is one chunk)
    halo: float  # slices each chunk holds beyond its own when the volume is several
    out: float  # its output, bytes per input voxel, kept for the whole volume


@dataclass(frozen=True)
class Profile:
    """A backbone's calibrated memory figures (fp32, CPU, conv-1/3/5, three regions)."""

    stages: tuple[Stage, ...]
    pooling: float  # bytes per input voxel live while pooling (masked-pool)
    weights: int  # bytes of the network's parameters and buffers, as built
    default: tuple[str, ...]  # the stages of the calibration's hooked layers (conv-1/3/5)
    streamed: Streamed | None = None  # None: the plain forward pass

    def index(self, stage: str) -> int:
        names = [s.name for s in self.stages]
        return names.index(stage) if stage in names else len(names) - 1


def _densenet(block3: int, block4: int, late: tuple[float, float, float], weights: int) -> Profile:
    """DenseNet121/169/201: the same stem and blocks 1-2; blocks 3-4 differ in width."""
    b3, t3, b4 = late
    return Profile(
        stages=(
            Stage("stem", 2, 64, 66.0),  # conv0's maps are at stride 2
            Stage("denseblock1", 4, 256, 52.0),
            Stage("transition1", 8, 128, 40.0),
            Stage("denseblock2", 8, 512, 4.34, piece=7.9),
            Stage("transition2", 16, 256, 4.3, piece=6.0, piece_stride=8),
            Stage("denseblock3", 16, block3, b3),
            Stage("transition3", 32, block3 // 2, t3),
            Stage("denseblock4", 32, block4, b4),
            Stage("norm5", 32, block4, b4),
        ),
        pooling=1.9,
        weights=weights,
        default=("denseblock4",) * 3,
        streamed=Streamed(stages=3, per_voxel=66.0, halo=24.0, out=1.0),
    )


def _resnet(layer1: int, late: tuple[float, float], halo: float, weights: int) -> Profile:
    """torchvision's ResNets inflated: stem to layer2 streamed, layer3-4 plain."""
    expand = layer1 // 64
    return Profile(
        stages=(
            Stage("stem", 2, 64, 66.0),
            Stage("layer1", 4, layer1, 20.0 if expand == 1 else 52.0),
            Stage("layer2", 8, 128 * expand, 10.0 if expand == 1 else 40.1),
            Stage("layer3", 16, 256 * expand, late[0]),
            Stage("layer4", 32, 512 * expand, late[1]),
        ),
        pooling=2.0,
        weights=weights,
        default=("layer4",) * 3,
        streamed=Streamed(stages=3, per_voxel=66.0, halo=halo, out=128 * expand * 4 / 512),
    )


def _medicalnet(
    peaks: tuple[float, ...], pooling: float, weights: int, wide: bool, conv5: str = "layer4"
) -> Profile:
    """MedicalNet's ResNets: output stride 8 (layer3-4 dilated), plain forward pass."""
    e = 4 if wide else 1
    names = ("stem", "layer1", "layer2", "layer3", "layer4")
    strides = (2, 4, 8, 8, 8)  # the stem's convolution has stride 2, its max pooling 2 more
    widths = (64, 64 * e, 128 * e, 256 * e, 512 * e)
    return Profile(
        stages=tuple(Stage(*s) for s in zip(names, strides, widths, peaks, strict=True)),
        pooling=pooling,
        weights=weights,
        default=("layer4", "layer4", conv5),
    )


# Calibrated on the CPU (module docstring); ``python -m bench.memory_estimate --calibrate``.
PROFILES: dict[str, Profile] = {
    "densenet121": _densenet(1024, 1024, (3.3, 2.9, 0.5), 45_306_056),
    "densenet169": _densenet(1280, 1664, (4.1, 3.8, 0.8), 74_805_832),
    "densenet201": _densenet(1792, 1920, (5.7, 5.7, 0.9), 102_241_096),
    "resnet18": _resnet(64, (3.0, 3.1), 13.0, 132_678_560),
    "resnet50": _resnet(256, (10.4, 6.1), 22.0, 184_833_192),
    "medicalnet-resnet10": _medicalnet(
        (64, 16.3, 10.0, 11.5, 38.0), 18.1, 57_445_216, False, conv5="layer3"
    ),
    "medicalnet-resnet18": _medicalnet(
        (64, 20.3, 9.6, 13.5, 42.0), 18.1, 131_976_072, False, conv5="layer3"
    ),
    "medicalnet-resnet34": _medicalnet((64, 20.3, 9.6, 13.5, 44.0), 20.1, 253_244_424, False),
    "medicalnet-resnet50": _medicalnet((64, 56.0, 40.3, 30.0, 68.0), 56.1, 184_833_192, True),
    "ct-fm": Profile(
        stages=(
            Stage("stem", 1, 32, 236.0),
            *(
                Stage(f"layers.{i}", 2**i, 32 * 2**i, peak)
                for i, peak in enumerate((512.2, 288.8, 203.0, 196.5, 191.5))
            ),
        ),
        pooling=3.0,
        weights=311_099_984,
        default=("layers.4",) * 3,
    ),
}


@dataclass(frozen=True)
class Estimate:
    """One subject's estimated peak memory in its feature actor, in bytes."""

    shape: Shape  # model input (D, H, W)
    backbone: str
    device: str  # "cpu" or "cuda": where the forward pass runs
    forward: int  # tensor memory of the forward pass and pooling (calibrated)
    inputs: int  # the hand-over: HU (int16 or float32, the stored window with --spacing), planes
    weights: int  # the network's parameters and buffers
    phase: str  # the stage (or "pooling", "resampling", "normalisation") of the peak
    image: int  # the float32 model input the actor makes, live through the forward pass
    prepare: int  # the resampling and normalisation on the device, at their peak

    @property
    def working(self) -> int:
        """The actor's call beyond the hand-over and the weights: the preparation of the
        input, or the input and the forward pass, whichever is larger."""
        return max(self.prepare, self.image + self.forward)

    @property
    def host(self) -> int:
        """The actor's own memory, without the process (:data:`WORKER_BASE_BYTES`): the
        hand-over, and on the CPU the network, the input it makes and the maps; on CUDA
        the hand-over's pinned copy instead."""
        if self.device == "cpu":
            return self.inputs + self.weights + self.working
        return 2 * self.inputs

    @property
    def gpu(self) -> int:
        """GPU memory (0 on the CPU): the network, the hand-over, the input and the maps."""
        return 0 if self.device == "cpu" else self.inputs + self.weights + self.working


def _stage_of_layer(profile: Profile, layer: str) -> str:
    """The stage of a module path; conv-K (counted from the end) as the calibration's
    conv-1/3/5 lie: conv-1 in ``default[0]``, conv-2 and conv-3 in ``default[1]``, the
    others in ``default[2]`` (the loaders pass module paths, resolved on the driver)."""
    if layer.startswith("conv-") and layer[5:].isdigit():
        return profile.default[min(2, int(layer[5:]) // 2)]
    return stage_of(layer)


def _share(shape: Shape, stride: int, chunk_slices: int) -> float:
    """The share of a stage's depth one piece holds (:meth:`DenseBlockStage._piece`)."""
    d, h, w = (max(1, n // stride) for n in shape)
    piece = max(math.ceil(chunk_slices * d / shape[0]), math.ceil(MIN_PIECE_VOXELS / (h * w)))
    return min(1.0, piece / d)


def _map_bytes(profile: Profile, stages: Sequence[str]) -> float:
    """Bytes per input voxel of hooked maps in ``stages`` (each as wide as its stage's widest)."""
    total = 0.0
    for name in stages:
        stage = profile.stages[profile.index(name)]
        total += stage.channels * 4 / stage.stride**3
    return total


def _forward(
    profile: Profile, shape: Shape, stages: Sequence[str], pooling: PoolingMode, chunk: int
) -> tuple[float, str]:
    """Peak bytes of the actor's call in fp32, and the phase where it falls."""
    voxels = math.prod(shape)
    deepest = max(profile.index(s) for s in stages)
    maps = _map_bytes(profile, stages)
    extra = max(0.0, maps - _map_bytes(profile, profile.default)) * voxels
    chunk_slices = max(1, chunk // (shape[1] * shape[2]))  # as cohort.model.hooks.run_hooked
    phases: list[tuple[float, str]] = []
    first = 0
    if profile.streamed is not None:
        s = profile.streamed
        if shape[0] <= chunk_slices:  # one chunk: the whole volume at once
            streamed = s.per_voxel * voxels
        else:
            plane = shape[1] * shape[2]
            streamed = s.per_voxel * (chunk_slices + s.halo) * plane + s.out * voxels
        streamed_stages = profile.stages[: s.stages]
        phases.append((streamed, f"{streamed_stages[0].name}-{streamed_stages[-1].name}"))
        first = s.stages
    for stage in profile.stages[first : deepest + 1]:
        share = _share(shape, stage.piece_stride or stage.stride, chunk_slices)
        per_voxel = stage.peak + stage.piece * share
        phases.append((per_voxel * voxels, stage.name))
    peak, phase = max(phases)
    peak += extra
    if pooling == "masked-input":  # a masked copy of the input; the last region's maps
        peak += (_MASKED_INPUT_BPV + maps) * voxels
    pooled = profile.pooling * voxels + 3 * extra  # the maps, and their float64 copies
    return (peak, phase) if peak >= pooled else (pooled, "pooling")


def estimate_peak_bytes(
    shape: Shape,
    backbone: str,
    layers: Sequence[str],
    pooling: PoolingMode = "masked-pool",
    precision: Precision = "fp32",
    device: str = "cpu",
    *,
    planes: int = 1,
    chunk_voxels: int = CHUNK_VOXELS,
    window: Shape | None = None,
    hu_bytes: int = 2,
    foreground: bool = False,
) -> Estimate:
    """The estimated peak of one subject whose model input is ``shape`` (D, H, W).

    ``layers`` are the hooked layers' module paths (conv-K ids are placed as
    conv-1/3/5 are, see :func:`_stage_of_layer`); ``planes`` the region index's
    planes (more than one where regions overlap); ``device`` ``cpu`` or ``cuda``;
    ``chunk_voxels`` the lean pass's depth chunk (its default is the pass's).
    ``window`` is the stored grid handed over when ``--spacing`` leaves the
    resampling to the actor (None: the hand-over is on the model's grid),
    ``hu_bytes`` its HU's bytes per voxel (2: int16; 4: float32), ``foreground``
    whether the actor computes the foreground's statistics (``--normalise
    foreground``).
    """
    if backbone not in PROFILES:
        raise ValueError(f"no memory profile for backbone {backbone!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    profile = PROFILES[backbone]
    stages = [_stage_of_layer(profile, layer) for layer in layers]
    forward, phase = _forward(
        profile, shape, stages or list(profile.default), pooling, chunk_voxels
    )
    voxels = math.prod(shape)
    if precision == "bf16" and device == "cuda":
        forward = forward / 2 + _BF16_INPUT_BPV * voxels
    prepare, preparing = prepare_bytes(shape, window, hu_bytes, foreground)
    image = IMAGE_BPV * voxels
    return Estimate(
        shape=shape,
        backbone=backbone,
        device=device,
        forward=int(forward),
        inputs=hu_bytes * math.prod(window or shape) + planes * voxels,
        weights=profile.weights,
        phase=preparing if prepare > image + forward else phase,
        image=image,
        prepare=int(prepare),
    )


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GB"


@dataclass(frozen=True)
class Budget:
    """What one subject's estimate (:attr:`Estimate.host`) may reach, and its source.

    A feature actor (:func:`actor_budget`) has ``--actor-memory`` less the worker
    process (:data:`WORKER_BASE_BYTES`, ``reserved``); an in-process run has the
    memory this machine has available less what the process already holds
    (:func:`cohort.execution.machine.in_process_budget`: nothing ``reserved``, the
    process is measured).
    """

    bytes: int  # what the estimate may reach
    reserved: int  # added to the estimate in the need shown: the process, not estimated
    source: str  # what the limit is, in words: "the 3 GB each actor has (--actor-memory)"
    in_process: bool = False  # the subject runs in this process, not in a feature actor


def actor_budget(cfg: RunConfig) -> Budget:
    """A feature actor's budget: ``--actor-memory`` less :data:`WORKER_BASE_BYTES`."""
    gb = cfg.execution.actor_memory_gb
    return Budget(
        int(gb * GIB) - WORKER_BASE_BYTES,
        WORKER_BASE_BYTES,
        f"the {gb:g} GB each actor has (--actor-memory)",
    )


def check_memory(
    shape: Shape,
    spacing: Sequence[float],
    cfg: RunConfig,
    layers: Sequence[str],
    device: str,
    image: Path | str,
    *,
    planes: int = 1,
    gpu_bytes: int | None = None,
    budget: Budget | None = None,
    window: Shape | None = None,
    hu_bytes: int = 2,
) -> Estimate:
    """Estimate the subject's peak (:func:`estimate_peak_bytes`) and compare it with
    ``budget`` (default: what a feature actor has, :func:`actor_budget`; an
    in-process run passes the machine's), and with ``gpu_bytes`` (the GPU's memory)
    where known; the loaders do not know it, so there the GPU part is estimated but
    not checked. When it does not fit: a :class:`~cohort.errors.GeometryError`
    naming the shape, the estimate, the limit and its source, and the fixes.
    ``spacing`` (mm along D, H, W) and ``image`` are for the message; ``window`` and
    ``hu_bytes`` describe the hand-over (:func:`estimate_peak_bytes`)."""
    model, pooling = cfg.model, cfg.pooling.mode
    foreground = cfg.preprocess.normalise == "foreground"

    def estimate(
        s: Shape,
        on: str = device,
        precision: Precision = model.precision,
        handed: Shape | None = window,
    ) -> Estimate:
        return estimate_peak_bytes(
            s,
            model.backbone,
            layers,
            pooling,
            precision,
            on,
            planes=planes,
            window=handed,
            hu_bytes=hu_bytes,
            foreground=foreground,
        )

    est = estimate(shape)
    budget = budget or actor_budget(cfg)
    host_over = est.host > budget.bytes
    gpu_over = gpu_bytes is not None and est.gpu > gpu_bytes
    if not host_over and not gpu_over:
        return est
    dims = "x".join(str(n) for n in shape)
    at = "x".join(f"{s:.4g}" for s in spacing)
    where = "GPU" if device == "cuda" else "CPU"
    parts = (
        f"{model.backbone} maps on the {where} {_gb(est.forward)} ({pooling}, {model.precision}, "
        f"peak in {est.phase}), the input {_gb(est.image)}, its preparation "
        f"{_gb(est.prepare)} at most, the hand-over {_gb(est.inputs)}, weights "
        f"{_gb(est.weights)}"
    )
    fixes = []
    if host_over:
        need = math.ceil((est.host + WORKER_BASE_BYTES) / GIB * 2) / 2  # in an actor
        held = parts if device == "cpu" else f"the hand-over and its pinned copy {_gb(est.host)}"
        if budget.in_process:
            head = (
                f"needs an estimated {_gb(est.host)} in this process ({held}), more than "
                f"{budget.source}"
            )
            fixes.append(
                "free memory on this machine (or raise its cgroup's memory limit); run on "
                f"Ray workers with more memory, --executor ray --actor-memory {need:g} "
                "(or more; with --address on a cluster)"
            )
        else:
            head = (
                f"needs an estimated {_gb(est.host + budget.reserved)} in its feature actor "
                f"({held}, plus {_gb(budget.reserved)} for the worker process), more than "
                f"{budget.source}"
            )
            fixes.append(f"more memory per actor, --actor-memory {need:g} (or more)")
    else:
        assert gpu_bytes is not None
        head = (
            f"needs an estimated {_gb(est.gpu)} of GPU memory ({parts}), more than the "
            f"GPU's {_gb(gpu_bytes)}"
        )
    # a coarser --spacing resamples on the device from the window handed over (today's
    # model input, where there is no --spacing yet)
    coarser = _coarser(
        shape,
        spacing,
        lambda s: estimate(s, handed=window or shape),
        budget.bytes,
        gpu_bytes,
    )
    if coarser:
        fixes.append(f"resample coarser with --spacing (e.g. --spacing {coarser})")
    crop = cfg.preprocess.crop_margin_mm
    fixes.append(
        "crop to the labelled regions with --crop-margin MM"
        if crop is None
        else f"a smaller --crop-margin than {crop:g} mm"
    )
    if device == "cpu":
        on_gpu = estimate(shape, "cuda", "fp32")
        fixes.append(
            f"run on GPU workers (--device cuda), where the network, its maps and the input "
            f"take {_gb(on_gpu.gpu)} of GPU memory (fp32) and the actor keeps the hand-over"
        )
    else:
        fixes.append("a GPU with more memory, or --precision bf16")
    raise GeometryError(
        f"image {image} gives a model input of {dims} voxels (D x H x W) at {at} mm, which "
        f"{head}; fixes: {'; '.join(fixes)}"
    )


def _coarser(
    shape: Shape,
    spacing: Sequence[float],
    estimate: Callable[[Shape], Estimate],
    budget: int,
    gpu_bytes: int | None,
) -> str:
    """An isotropically coarser ``--spacing`` (at most 8x) whose model input fits, or ""."""

    def fits(k: float) -> bool:
        s: Shape = (
            max(1, math.floor(shape[0] / k + 0.5)),
            max(1, math.floor(shape[1] / k + 0.5)),
            max(1, math.floor(shape[2] / k + 0.5)),
        )
        e = estimate(s)
        return e.host <= budget and (gpu_bytes is None or e.gpu <= gpu_bytes)

    lo, hi = 1.0, 8.0
    if not fits(hi):
        return ""
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return ",".join(f"{math.ceil(s * hi * 1000) / 1000:g}" for s in spacing)
