"""Typed, frozen configuration for every stage, validated once at the edge.

Each stage takes its own config object explicitly. Defaults are the numerical
contract of the README's "What is computed" table; every default is an option
(:mod:`cohort.cli.options` reads choices and defaults from here) and is
written into ``run.json``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from cohort.errors import ConfigError

__all__ = [
    "AXES",
    "BACKBONES",
    "BACKGROUND",
    "DEFAULT_LABELS",
    "DEFAULT_LAYERS",
    "INFLATED",
    "IN_PROCESS_MAX_SUBJECTS",
    "PRESETS",
    "RESERVED_COLUMNS",
    "AdjustConfig",
    "Device",
    "ExecutionConfig",
    "Executor",
    "Inflation",
    "LabelMap",
    "MaskResample",
    "ModelConfig",
    "Normalise",
    "PoolingConfig",
    "PoolingMode",
    "Precision",
    "PreprocessConfig",
    "Preset",
    "Progress",
    "RegionConfig",
    "RunConfig",
    "StatsConfig",
    "WeightsChoice",
    "default_weights",
    "format_label_map",
    "names_only",
    "parse_label_map",
    "preset_of",
]

# Label maps are ordered (name, value) pairs: the order is the order regions
# appear in outputs. "background" is reserved for "in no named label". A value
# of None names a region without a value: a mask file of a mask folder or a
# segment of a 3D Slicer segmentation (written as a bare name, "liver,spleen").
# In one map either every region has a value or none has.
LabelMap = tuple[tuple[str, int | None], ...]
BACKGROUND = "background"
DEFAULT_LABELS: LabelMap = (("tibia", 1), ("femur", 2))
DEFAULT_LAYERS: tuple[str, ...] = ("conv-1", "conv-3", "conv-5")

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_BARE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-. ]*$")  # file or segment names: also . and space


def parse_label_map(text: str) -> LabelMap:
    """Parse ``"tibia=1,femur=2"`` into ``(("tibia", 1), ("femur", 2))``, and bare
    names ``"liver,spleen"`` into ``(("liver", None), ("spleen", None))``.

    ``NAME=INT`` pairs name the values of a label-map file; bare names name the
    files of a mask folder or the segments of a ``.seg.nrrd``; one map holds one
    kind. Names must start with a letter and use letters, digits, ``_``, ``-``
    (bare names also ``.`` and spaces, as file and segment names do), values
    positive integers; names and values must each be unique; ``background`` is
    reserved.
    """
    text = text.strip()
    if not text:
        raise ConfigError(
            "empty label map; write it as NAME=INT,... (a label-map file, e.g. tibia=1,femur=2) "
            "or as bare names (a mask folder or .seg.nrrd, e.g. liver,spleen)"
        )
    pairs: list[tuple[str, int | None]] = []
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not name or (sep and not value):
            raise ConfigError(
                f"label map item {item!r} is neither NAME=INT (e.g. tibia=1) nor a bare name "
                "(e.g. liver)"
            )
        if not (_NAME if sep else _BARE_NAME).match(name):
            also = "" if sep else ", . or space"
            raise ConfigError(
                f"label name {name!r} must start with a letter and use letters, digits, _ or -"
                f"{also}"
            )
        if name == BACKGROUND:
            raise ConfigError(
                f"label name {BACKGROUND!r} is reserved for voxels in no named label; "
                "pick another name"
            )
        number: int | None = None
        if sep:
            try:
                number = int(value)
            except ValueError:
                raise ConfigError(f"label value {value!r} for {name!r} is not an integer") from None
            if number <= 0:
                raise ConfigError(
                    f"label value for {name!r} must be a positive integer, got {number}"
                )
        pairs.append((name, number))
    names = [n for n, _ in pairs]
    values = [v for _, v in pairs if v is not None]
    if values and len(values) != len(pairs):
        raise ConfigError(
            f"label map {text!r} mixes NAME=INT pairs and bare names; use NAME=INT,... for a "
            "label-map file (e.g. tibia=1,femur=2) or bare names for a mask folder or .seg.nrrd "
            "(e.g. liver,spleen)"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"label names repeat in {text!r}; each name once")
    if len(set(values)) != len(values):
        raise ConfigError(f"label values repeat in {text!r}; each value names one region")
    return tuple(pairs)


def format_label_map(labels: LabelMap) -> str:
    """Inverse of :func:`parse_label_map`."""
    return ",".join(name if value is None else f"{name}={value}" for name, value in labels)


def names_only(labels: LabelMap) -> bool:
    """Whether ``labels`` holds bare names (a mask folder or .seg.nrrd), not NAME=INT pairs."""
    return all(value is None for _, value in labels)


MaskResample = Literal["off", "nearest"]
Normalise = Literal["fixed", "foreground"]
# Directions the model input's (D, H, W) axes point to, as nibabel axis codes: "SAR" is
# RAS+ as (D, H, W) (D inferior -> superior, H posterior -> anterior, W left -> right);
# each axis may be reversed ("SPL": D up, H towards the back, W towards the left).
AXES: tuple[str, ...] = tuple(d + h + w for d in "SI" for h in "AP" for w in "RL")


@dataclass(frozen=True)
class Preset:
    """A backbone family's published preprocessing: the defaults of a run with it.

    Each value is the default of the :class:`PreprocessConfig` field of the same
    name when ``cohort run`` uses a backbone of the family; any option overrides it.
    """

    name: str  # recorded as PreprocessConfig.preset
    hu_min: float  # HU window: clip, then scale to [0, 1]
    hu_max: float
    normalise: Normalise  # "fixed": (x - mean) / std; "foreground": z-score of voxels > fg HU
    mean: float
    std: float
    foreground_hu: float  # "foreground": the statistics use voxels above this HU
    axes: str  # one of AXES
    target_spacing: tuple[float, float, float] | None  # mm along (D, H, W); None keeps
    source: str  # where the values are published


# fmt: off
PRESETS: dict[str, Preset] = {p.name: p for p in (
    #      name          HU window         normalise     mean   std    fg HU axes   spacing
    Preset("imagenet",   -1000.0, 2000.0, "fixed",      0.449, 0.226, 0.0,  "SAR", None,
           "the origin study: HU window [-1000, 2000] to [0, 1], torchvision's ImageNet "
           "statistics averaged over RGB (mean 0.449, std 0.226), RAS+ as (D, H, W)"),
    Preset("medicalnet", -1024.0, 3071.0, "foreground", 0.0,   1.0,   0.0,  "SAR", None,
           "Tencent/MedicalNet datasets/brains18.py: the stored volume as (D, H, W), z-score "
           "over the voxels > 0 (itensity_normalize_one_volume), no clipping, no fixed spacing "
           "(it resizes to the network's input); here clipped to [-1024, 3071] HU, the 12-bit "
           "CT range, so padding outside the field of view does not count"),
    Preset("ct-fm",      -1024.0, 2048.0, "fixed",      0.0,   1.0,   0.0,  "SPL", (3.0, 1.0, 1.0),
           "project-lighter CT-FM (model card and pre-training config): orientation SPL, "
           "ScaleIntensityRange HU [-1024, 2048] to [0, 1] clipped, spacing 3 x 1 x 1 mm "
           "(SPL), CropForeground (here: --crop-margin, off by default)"),
)}
# fmt: on
_IMAGENET = PRESETS["imagenet"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT volume becomes model input (the numerical contract).

    The defaults are DenseNet121's preset (:data:`PRESETS` ``"imagenet"``);
    :meth:`for_backbone` gives another backbone's.
    """

    preset: str = _IMAGENET.name  # the preset the values below start from (a key of PRESETS)
    hu_min: float = _IMAGENET.hu_min  # HU window low end; also the "air" value for masked-input
    hu_max: float = _IMAGENET.hu_max  # HU window high end
    normalise: Normalise = _IMAGENET.normalise  # after scaling the window to [0, 1]
    mean: float = _IMAGENET.mean  # "fixed": gray ImageNet mean
    std: float = _IMAGENET.std  # "fixed": gray ImageNet std
    foreground_hu: float = _IMAGENET.foreground_hu  # "foreground": statistics of voxels > this
    axes: str = _IMAGENET.axes  # directions of the model input's (D, H, W) axes, one of AXES
    target_spacing: tuple[float, float, float] | None = _IMAGENET.target_spacing  # mm (D, H, W)
    crop_margin_mm: float | None = None  # crop to the labelled bounding box plus this margin
    affine_tolerance_mm: float = 1e-3  # same grid: every corner voxel centre this close (mm)
    max_voxels: int = 512 * 512 * 1024  # larger volumes are refused before allocation
    mask_resample: MaskResample = "off"  # "nearest": put a mask on another grid onto the image's

    @classmethod
    def for_backbone(cls, backbone: str, **given: Any) -> PreprocessConfig:
        """The preset of ``backbone`` (its family's published preprocessing), then ``given``."""
        preset = PRESETS[preset_of(backbone)]
        values = {
            f.name: getattr(preset, f.name)
            for f in dataclasses.fields(Preset)
            if f.name not in ("name", "source")
        }
        return cls(preset=preset.name, **{**values, **given})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not self.hu_min < self.hu_max:
            raise ConfigError(f"HU window must have low < high, got [{self.hu_min}, {self.hu_max}]")
        if self.normalise not in get_args(Normalise):
            raise ConfigError(
                f"normalise must be one of {', '.join(get_args(Normalise))}, got {self.normalise!r}"
            )
        if self.std <= 0:
            raise ConfigError(f"normalisation std must be > 0, got {self.std}")
        if self.normalise == "foreground" and not self.hu_min <= self.foreground_hu < self.hu_max:
            raise ConfigError(
                f"the foreground threshold {self.foreground_hu:g} HU of --normalise foreground "
                f"must lie in the HU window [{self.hu_min:g}, {self.hu_max:g})"
            )
        if self.axes not in AXES:
            raise ConfigError(
                f"axes must be three axis codes, one of S/I, A/P, R/L in that order (e.g. SAR, "
                f"SPL), got {self.axes!r}"
            )
        if self.target_spacing is not None and (
            len(self.target_spacing) != 3 or min(self.target_spacing) <= 0
        ):
            raise ConfigError(
                f"target spacing must be three positive mm values, got {self.target_spacing}"
            )
        if self.crop_margin_mm is not None and self.crop_margin_mm < 0:
            raise ConfigError(f"crop margin must be >= 0 mm, got {self.crop_margin_mm}")
        if self.affine_tolerance_mm <= 0:
            raise ConfigError("affine tolerance must be > 0 mm")
        if self.max_voxels <= 0:
            raise ConfigError("max voxels must be > 0")
        if self.mask_resample not in get_args(MaskResample):
            raise ConfigError(
                f"mask resample must be one of {', '.join(get_args(MaskResample))}, "
                f"got {self.mask_resample!r}"
            )


@dataclass(frozen=True)
class RegionConfig:
    """Which regions are pooled: named label values plus optional background."""

    labels: LabelMap = DEFAULT_LABELS  # default map or names; a manifest row may override it
    background: bool = True  # add "background" = every voxel in no named label

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError("at least one named label is needed")
        parse_label_map(format_label_map(self.labels))  # same checks as the parser

    def names(self) -> tuple[str, ...]:
        named = tuple(name for name, _ in self.labels)
        return (*named, BACKGROUND) if self.background else named


WeightsChoice = str  # "imagenet" or "pretrained", "random", or a path to a weights file
Inflation = Literal["mean", "centre"]
Precision = Literal["fp32", "bf16"]
# Backbone names; cohort.model.network.BACKBONES says how to build each (a test
# checks that the two agree). Kept here so that the CLI lists them without torch.
# The inflated ones are torchvision's 2D ImageNet networks made 3D; the others are
# 3D networks pretrained on CT (and MR), with the preset of their family.
INFLATED: tuple[str, ...] = ("densenet121", "densenet169", "densenet201", "resnet18", "resnet50")
_PRESET_OF: dict[str, str] = {
    **dict.fromkeys(INFLATED, "imagenet"),
    "medicalnet-resnet10": "medicalnet",
    "medicalnet-resnet18": "medicalnet",
    "medicalnet-resnet34": "medicalnet",
    "medicalnet-resnet50": "medicalnet",
    "ct-fm": "ct-fm",
}
BACKBONES: tuple[str, ...] = tuple(_PRESET_OF)


def preset_of(backbone: str) -> str:
    """The name of ``backbone``'s preprocessing preset (a key of :data:`PRESETS`)."""
    try:
        return _PRESET_OF[backbone]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}"
        ) from None


def default_weights(backbone: str) -> WeightsChoice:
    """``imagenet`` for the inflated backbones, ``pretrained`` (the published file) otherwise."""
    preset_of(backbone)
    return "imagenet" if backbone in INFLATED else "pretrained"


@dataclass(frozen=True)
class ModelConfig:
    """Which network, with which weights, hooked where."""

    backbone: str = "densenet121"  # one of BACKBONES
    weights: WeightsChoice = "imagenet"  # "imagenet" (inflated), "pretrained" (3D), "random", PATH
    seed: int = 0  # seed for "random" weights
    inflation: Inflation = "mean"  # I3D mean inflation, or "centre" (inflated backbones)
    layers: tuple[str, ...] = DEFAULT_LAYERS  # conv-K specs or module paths
    weights_sha256: str | None = None  # expected sha256 of a weights file, if known
    precision: Precision = "fp32"  # "bf16": autocast on CUDA (faster, cosines move ~1e-3)

    def __post_init__(self) -> None:
        preset_of(self.backbone)  # names the choices when unknown
        if self.inflation not in get_args(Inflation):
            raise ConfigError(f"inflation must be 'mean' or 'centre', got {self.inflation!r}")
        if self.precision not in get_args(Precision):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if not self.layers:
            raise ConfigError("at least one layer must be hooked")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers repeat in {self.layers}; list each once")
        if not self.weights:
            raise ConfigError("weights must be 'imagenet', 'pretrained', 'random' or a file path")
        inflated = self.backbone in INFLATED
        if self.weights == "imagenet" and not inflated:
            raise ConfigError(
                f"{self.backbone} is a 3D network pretrained on CT and has no ImageNet weights; "
                "use --weights pretrained (its published file), --weights PATH or --weights random"
            )
        if self.weights == "pretrained" and inflated:
            raise ConfigError(
                f"{self.backbone}'s pretrained weights are torchvision's ImageNet weights: use "
                "--weights imagenet (or PATH, or random)"
            )
        if self.inflation != "mean" and not inflated:
            raise ConfigError(
                f"--inflation applies to the inflated backbones ({', '.join(INFLATED)}); "
                f"{self.backbone} is 3D already"
            )


PoolingMode = Literal["masked-pool", "masked-gem", "masked-input"]


@dataclass(frozen=True)
class PoolingConfig:
    """How a hooked feature map becomes one vector per region."""

    mode: PoolingMode = "masked-pool"  # see cohort.model.pooling
    gem_p: float = 3.0  # exponent of the generalised mean (masked-gem only)
    min_coverage: float = 0.01  # least region weight, in grid cells, a layer must see

    def __post_init__(self) -> None:
        if self.mode not in get_args(PoolingMode):
            raise ConfigError(
                f"pooling must be one of {', '.join(get_args(PoolingMode))}, got {self.mode}"
            )
        if self.gem_p < 1:
            raise ConfigError(f"GeM exponent must be >= 1, got {self.gem_p}")
        if self.min_coverage < 0:
            raise ConfigError(f"min coverage must be >= 0 cells, got {self.min_coverage}")


Device = Literal["auto", "cpu", "cuda"]
Progress = Literal["auto", "verbose", "quiet"]
# where the stages run: Ray (a private local instance, or the cluster at --address), or
# this process without Ray; auto picks (cohort.execution.session.pick_executor)
Executor = Literal["auto", "ray", "in-process"]
# the most subjects auto runs in-process: a pilot study or a first try, where starting
# Ray, its workers and a feature actor (10-12 s on 2 CPUs, bench/SCALING.md) is much of
# the run; a larger cohort gains Ray's loader processes and worker isolation
IN_PROCESS_MAX_SUBJECTS = 64


@dataclass(frozen=True)
class ExecutionConfig:
    """Where and how wide the pipeline runs (not part of the results' identity)."""

    device: Device = "auto"  # auto = cuda when the actor sees a GPU
    executor: Executor = "auto"  # auto: in-process for a small local run, else Ray
    address: str | None = None  # Ray cluster address; None starts a local instance
    num_actors: int | None = None  # feature actors; None = GPUs, or 1 on CPU
    actor_cpus: float = 0.25  # CPUs each actor requests (fractional keeps loaders fed)
    loader_cpus: float = 0.5  # CPUs each load/preprocess task requests
    torch_threads: int | None = None  # intra-op threads per actor; None = torch's default
    progress: Progress = "auto"  # auto: a bar on a terminal, a steady line in a log
    stall_timeout_s: float | None = None  # abort when no subject finishes for this long
    max_retries: int = 2  # retries of a subject's task after a worker dies or I/O fails
    # memory each actor reserves from Ray, GB of 2^30 bytes; a subject whose estimated
    # peak exceeds it fails at the check stage (cohort.model.memory); 3 GB holds a
    # 512 x 512 x 216 CT with DenseNet121 on the CPU (about 2 GB)
    actor_memory_gb: float = 3.0

    def __post_init__(self) -> None:
        if self.progress not in get_args(Progress):
            raise ConfigError(f"progress must be auto, verbose or quiet, got {self.progress!r}")
        if self.device not in get_args(Device):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.executor not in get_args(Executor):
            raise ConfigError(f"executor must be auto, ray or in-process, got {self.executor!r}")
        if self.executor == "in-process" and (self.address or (self.num_actors or 1) > 1):
            raise ConfigError(
                "--executor in-process runs one model in this process, without Ray; drop "
                "--address and --actors, or use --executor ray (or auto)"
            )
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"num actors must be >= 1, got {self.num_actors}")
        if self.actor_cpus < 0 or self.loader_cpus <= 0:
            raise ConfigError("actor CPUs must be >= 0 and loader CPUs > 0")
        if self.actor_cpus == self.loader_cpus:
            # Ray Data fuses a map into the actor stage when their resource requests
            # are equal; then loading would run inside the model actors.
            raise ConfigError(
                f"actor CPUs and loader CPUs must differ (both {self.actor_cpus}); "
                "equal requests make Ray fuse loading into the model actors"
            )
        if self.stall_timeout_s is not None and self.stall_timeout_s <= 0:
            raise ConfigError("stall timeout must be > 0 seconds")
        if self.max_retries < 0:
            raise ConfigError("max retries must be >= 0")
        if self.actor_memory_gb <= 0:
            raise ConfigError(f"actor memory must be > 0 GB, got {self.actor_memory_gb}")

    @property
    def progress_flags(self) -> tuple[bool, bool]:
        """(quiet, verbose), as :func:`cohort.execution.progress.pick_mode` takes them."""
        return self.progress == "quiet", self.progress == "verbose"


@dataclass(frozen=True)
class StatsConfig:
    """Options of the reducer's statistics."""

    bootstrap: int = 2000  # bootstrap resamples for the CI of each mean
    permutations: int = 999  # permutations of the feature-level test
    seed: int = 0  # seed of every resampling
    alpha: float = 0.05  # level used for flags and reports
    min_n: int = 3  # fewest subjects per group for a test to run
    centre: bool = False  # subtract the run's mean vector per layer before cosine
    ci_level: float = 0.95  # coverage of every bootstrap percentile interval

    def __post_init__(self) -> None:
        if self.bootstrap < 0 or self.permutations < 0:
            raise ConfigError("bootstrap and permutation counts must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")
        if not 0 < self.ci_level < 1:
            raise ConfigError(f"CI level must lie in (0, 1), got {self.ci_level}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.min_n < 1:
            raise ConfigError(f"min n must be >= 1, got {self.min_n}")


# Manifest columns that cannot be covariates, strata or the harmonisation batch: the
# subject's identity, files and group (cohort is the term every adjusted test is about).
RESERVED_COLUMNS: tuple[str, ...] = (
    "subject_id",
    "image",
    "mask",
    "cohort",
    "labels",
    "series_uid",
)
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class AdjustConfig:
    """Covariates, strata and harmonisation of the between-cohort tests (off by default).

    Every column named here comes from the manifest (or ``subjects_table``); with all
    fields at their defaults the statistics are exactly the unadjusted ones.
    """

    covariates: tuple[str, ...] = ()  # columns the adjusted tests adjust for, in this order
    strata: str | None = None  # permutations stay within the levels of this column
    harmonise: str | None = None  # ComBat over the batches (sites, scanners) of this column
    harmonise_with: str | None = None  # a finished run's folder whose fitted ComBat to apply
    drop_incomplete: bool = False  # leave out subjects with a missing value instead of failing
    subjects_table: str | None = None  # CSV/Parquet: subject_id + the columns, instead of manifest

    def __post_init__(self) -> None:
        named = [*self.covariates, *(c for c in (self.strata, self.harmonise) if c is not None)]
        for name in named:
            if not _COLUMN.match(name):
                raise ConfigError(
                    f"column name {name!r} must start with a letter or _ and use letters, "
                    "digits, _, . or -; name a column of the manifest or subjects table"
                )
            if name in RESERVED_COLUMNS:
                raise ConfigError(
                    f"{name!r} is a manifest column of its own and cannot be a covariate, stratum "
                    f"or batch (reserved: {', '.join(RESERVED_COLUMNS)}); name another column"
                )
        if len(set(self.covariates)) != len(self.covariates):
            raise ConfigError(f"covariates repeat in {','.join(self.covariates)}; list each once")
        if self.harmonise is not None and self.harmonise in self.covariates:
            raise ConfigError(
                f"{self.harmonise!r} is both the harmonisation batch and a covariate; ComBat "
                "removes the batch effect, so adjusting for it again is meaningless: drop one"
            )
        if self.harmonise is not None and self.harmonise_with is not None:
            raise ConfigError(
                "--harmonise fits a new ComBat model and --harmonise-with applies a fitted one; "
                "give one of them"
            )

    @property
    def active(self) -> bool:
        """Whether anything differs from the unadjusted statistics."""
        return bool(self.covariates) or self.strata is not None or self.harmonising

    @property
    def harmonising(self) -> bool:
        return self.harmonise is not None or self.harmonise_with is not None

    def columns(self) -> tuple[str, ...]:
        """Every column named here (covariates, strata, batch), each once, in that order."""
        named = [*self.covariates, self.strata, self.harmonise]
        return tuple(dict.fromkeys(c for c in named if c is not None))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; one object, passed explicitly."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    regions: RegionConfig = field(default_factory=RegionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    adjust: AdjustConfig = field(default_factory=AdjustConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
