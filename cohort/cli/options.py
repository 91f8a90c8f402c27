"""Command-line options shared by ``cohort run``, ``demo``, ``stats`` and ``jobs/analyze.py``.

One definition of each option. Choices and defaults are read from the config
types (:mod:`cohort.config`), never retyped here; :func:`run_config` turns the
parsed values into a validated :class:`~cohort.config.RunConfig`, once, at the
edge. Importing this module imports neither torch nor pandas.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, get_args

import click

from cohort.config import (
    AXES,
    BACKBONES,
    IN_PROCESS_MAX_SUBJECTS,
    PRESETS,
    AdjustConfig,
    Device,
    ExecutionConfig,
    Executor,
    Inflation,
    MaskResample,
    ModelConfig,
    Normalise,
    PoolingConfig,
    PoolingMode,
    Precision,
    PreprocessConfig,
    Preset,
    RegionConfig,
    RunConfig,
    StatsConfig,
    default_weights,
    format_label_map,
    parse_label_map,
)
from cohort.errors import ConfigError

__all__ = [
    "ADJUST_OPTIONS",
    "BACKBONE",
    "BACKGROUND",
    "LABELS",
    "LAYERS",
    "MASK_RESAMPLE",
    "PREPROCESS_OPTIONS",
    "RUN_OPTIONS",
    "STATS_OPTIONS",
    "adjust_config",
    "apply",
    "defaults",
    "layer_specs",
    "preprocess_config",
    "run_config",
    "stats_config",
]

F = TypeVar("F", bound=Callable[..., Any])

_PRE, _REG, _MODEL = PreprocessConfig(), RegionConfig(), ModelConfig()
_POOL, _EXEC, _STATS = PoolingConfig(), ExecutionConfig(), StatsConfig()


def _floats(text: str | None, count: int, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{what} must be {count} numbers, got {text!r}") from None
    if len(values) != count:
        raise click.BadParameter(f"{what} must be {count} numbers, got {text!r}")
    return values


def _by_preset(show: Callable[[Any], str]) -> str:
    """What an option defaults to: the value of the backbone's preset, per preset."""
    return "the backbone's preset: " + "; ".join(
        f"{name} {show(preset)}" for name, preset in PRESETS.items()
    )


def _spacing(value: tuple[float, float, float] | None) -> str:
    return "keep" if value is None else ",".join(f"{v:g}" for v in value)


# Statistics options default to None: ``cohort stats`` then keeps the run's own
# setting, and ``cohort run`` takes StatsConfig's default (shown in --help).
def _kept(flag: str, kind: type, shown: object, text: str) -> Callable[[F], F]:
    """A statistics option that is None unless given (``cohort stats`` keeps the run's)."""
    return click.option(flag, type=kind, default=None, show_default=str(shown), help=text)


STATS_OPTIONS: list[Callable[[F], F]] = [
    _kept("--bootstrap", int, _STATS.bootstrap, "Bootstrap resamples."),
    _kept("--permutations", int, _STATS.permutations, "Permutations of the feature test."),
    _kept("--stats-seed", int, _STATS.seed, "Seed of every resampling."),
    _kept("--min-n", int, _STATS.min_n, "Fewest subjects per group."),
    _kept("--ci-level", float, _STATS.ci_level, "Coverage of every bootstrap percentile interval."),
    click.option(
        "--centre/--raw",
        default=None,
        show_default="raw" if not _STATS.centre else "centre",
        help="Subtract, per layer, the mean vector over every subject and region of the run "
        "before cosine (raw keeps the origin study's numbers comparable).",
    ),
]

# Covariates, strata and harmonisation (AdjustConfig); None unless given, so that
# ``cohort stats`` keeps the run's own; an empty value turns one off there.
ADJUST_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--covariates",
        default=None,
        help="Columns (a,b,...) to adjust the between-cohort tests for: numeric columns are "
        "continuous, others categorical (reference level: the first in sorted order). Adds "
        "Freedman-Lane tests of each cosine and a PERMANOVA by margin per feature space. "
        "Columns come from the manifest or --subjects-table.",
    ),
    click.option(
        "--subjects-table",
        default=None,
        help="CSV or Parquet file: subject_id plus the columns --covariates, --strata and "
        "--harmonise name (it wins over the manifest where both have a column).",
    ),
    click.option(
        "--drop-incomplete/--no-drop-incomplete",
        default=None,
        show_default="no: a missing value is an error naming the subjects",
        help="Leave subjects with a missing covariate, stratum or batch out of the tests that "
        "need it (each row counts them).",
    ),
    click.option(
        "--strata",
        default=None,
        help="Column whose levels every permutation (adjusted or not) stays within.",
    ),
    click.option(
        "--harmonise",
        default=None,
        help="Column of batches (site, scanner): ComBat (parametric empirical Bayes) on the "
        "pooled feature vectors, preserving cohort and the covariates, before the cosines and "
        "tests; writes features_harmonised.parquet and the fitted model.",
    ),
    click.option(
        "--harmonise-with",
        default=None,
        help="Folder of a finished --harmonise run: apply its fitted ComBat model, without "
        "refitting.",
    ),
]

# click parameter name -> StatsConfig field
_STATS_FIELDS: Mapping[str, str] = {
    "bootstrap": "bootstrap",
    "permutations": "permutations",
    "stats_seed": "seed",
    "min_n": "min_n",
    "ci_level": "ci_level",
    "centre": "centre",
}


def _shown(flag: str, default: Any, text: str | None = None, **extra: Any) -> Callable[[F], F]:
    """An option whose default ``--help`` shows."""
    return click.option(flag, default=default, show_default=True, help=text, **extra)


def _choice(flag: str, literal: Any, default: str, text: str | None = None) -> Callable[[F], F]:
    """An option that takes one value of the Literal type ``literal``."""
    return _shown(flag, default, text, type=click.Choice(get_args(literal)))


def _preset(flag: str, show: Callable[[Preset], str], text: str, **extra: Any) -> Callable[[F], F]:
    """An option that defaults to the backbone's preset (None until given)."""
    return click.option(flag, default=None, show_default=_by_preset(show), help=text, **extra)


# Options that `cohort validate` shares with `cohort run`.
LABELS = _shown(
    "--labels",
    format_label_map(_REG.labels),
    "Regions: NAME=INT,... for label-map masks, bare names (liver,spleen) for mask "
    "folders and .seg.nrrd; a manifest 'labels' cell overrides per row.",
)
MASK_RESAMPLE = _choice(
    "--mask-resample",
    MaskResample,
    _PRE.mask_resample,
    "nearest: put a mask on another grid onto the image grid (each region by nearest "
    "neighbour in world coordinates); off: such a pair is an error.",
)
_WEIGHTS_HELP = (
    "imagenet (torchvision's cache; inflated backbones), pretrained (the published file of a "
    "3D backbone, cached like torchvision's), random (seeded) or PATH to a weights file (.pth "
    "state dict, bare or under 'state_dict'; .safetensors)."
)
_VERBOSE_HELP = (
    "A line per finished subject (by default: a bar on a terminal, a line every 30 s and 1 % "
    "of the subjects in a log)."
)

BACKGROUND = _shown(
    "--background/--no-background",
    _REG.background,
    "Add the region 'background' (every voxel in no named label).",
)
LAYERS = _shown(
    "--layers",
    ",".join(_MODEL.layers),
    "conv-K (K-th conv from the end, in execution order) or module paths.",
)
BACKBONE = _shown(
    "--backbone",
    _MODEL.backbone,
    "Inflated torchvision networks (ImageNet) or 3D "
    "networks pretrained on CT (MedicalNet, CT-FM); each brings its preprocessing preset.",
    type=click.Choice(BACKBONES),
)
# how a subject becomes model input: `cohort run` and `cohort validate` take them alike
PREPROCESS_OPTIONS: list[Callable[[F], F]] = [
    _preset(
        "--hu-window", lambda p: f"{p.hu_min:g},{p.hu_max:g}", "HU clip LOW,HIGH, scaled to [0, 1]."
    ),
    _preset(
        "--normalise",
        lambda p: p.normalise,
        "fixed: (x - mean) / std with --mean-std; "
        "foreground: z-score of each volume's foreground voxels (MedicalNet's).",
        type=click.Choice(get_args(Normalise)),
    ),
    _preset(
        "--mean-std",
        lambda p: f"{p.mean:g},{p.std:g}",
        "MEAN,STD of --normalise fixed, after scaling the window to [0, 1].",
    ),
    _preset(
        "--axes",
        lambda p: p.axes,
        "Where the model input's D, H, W axes point (SAR: RAS+ as D,H,W; SPL: CT-FM's).",
        type=click.Choice(AXES),
    ),
    _preset(
        "--spacing",
        lambda p: _spacing(p.target_spacing),
        "Resample to D,H,W mm, or 'keep' the stored grid.",
    ),
    click.option("--crop-margin", type=float, default=None, help="Crop to labels + mm margin."),
    MASK_RESAMPLE,
    _shown("--max-voxels", _PRE.max_voxels, "Refuse larger volumes before reading them."),
]

RUN_OPTIONS: list[Callable[[F], F]] = [
    LABELS,
    BACKGROUND,
    LAYERS,
    _choice(
        "--pooling",
        PoolingMode,
        _POOL.mode,
        "masked-pool: one pass, mask-weighted mean; masked-input: origin protocol.",
    ),
    _shown("--gem-p", _POOL.gem_p, "GeM exponent."),
    _shown(
        "--min-coverage",
        _POOL.min_coverage,
        "Least region weight, in grid cells, a hooked layer must see.",
    ),
    click.option(
        "--weights",
        default=None,
        show_default="imagenet for the inflated backbones, pretrained for the 3D ones",
        help=_WEIGHTS_HELP,
    ),
    click.option("--weights-sha256", default=None, help="Expected sha256 of the weights file."),
    BACKBONE,
    _shown("--seed", _MODEL.seed, "Seed of random weights."),
    _choice("--inflation", Inflation, _MODEL.inflation),
    _choice(
        "--precision",
        Precision,
        _MODEL.precision,
        "bf16: autocast the network on CUDA "
        "(faster; vectors differ from fp32 by about 1e-2 relative). CUDA only.",
    ),
    *PREPROCESS_OPTIONS,
    _choice("--device", Device, _EXEC.device),
    _choice(
        "--executor",
        Executor,
        _EXEC.executor,
        "Where the stages run: auto runs a local cohort of at most "
        f"{IN_PROCESS_MAX_SUBJECTS} subjects in this process (no Ray start-up), else on Ray.",
    ),
    click.option("--address", default=None, help="Ray cluster address (default: local)."),
    click.option("--actors", type=int, default=None, help="Feature actors (default: GPUs or 1)."),
    _shown("--actor-cpus", _EXEC.actor_cpus, "CPUs/actor."),
    _shown("--loader-cpus", _EXEC.loader_cpus, "CPUs per load task."),
    click.option("--threads", type=int, default=None, help="Torch threads per CPU actor."),
    _shown(
        "--actor-memory",
        _EXEC.actor_memory_gb,
        "GB of memory each Ray actor reserves; a "
        "subject whose estimated peak needs more fails at the check stage, naming the value "
        "it needs (in-process, the memory this machine has available decides instead).",
    ),
    click.option("--stall-timeout", type=float, help="Abort after this many s without progress."),
    _shown("--retries", _EXEC.max_retries, "Retries after a worker dies or a transient I/O error."),
    click.option("--quiet", is_flag=True, help="No progress (errors and the summary only)."),
    click.option("--verbose", is_flag=True, help=_VERBOSE_HELP),
    *STATS_OPTIONS,
    *ADJUST_OPTIONS,
]


def apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    """Decorate a command with ``options`` (in the order listed)."""

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def defaults(options: list[Any]) -> dict[str, Any]:
    """The value of every option in ``options`` when none is given, keyed as click passes it."""

    @click.command()
    @apply(options)
    def probe(**values: Any) -> dict[str, Any]:
        return values

    return dict(probe.main([], standalone_mode=False))


def stats_config(values: Mapping[str, Any], base: StatsConfig | None = None) -> StatsConfig:
    """``base`` (default: StatsConfig()) with every statistics option that was given."""
    given = {
        field: values[name] for name, field in _STATS_FIELDS.items() if values[name] is not None
    }
    try:
        return dataclasses.replace(base or StatsConfig(), **given)
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def _path(text: str) -> str | None:
    return os.path.abspath(os.path.expanduser(text.strip())) if text.strip() else None


def adjust_config(values: Mapping[str, Any], base: AdjustConfig | None = None) -> AdjustConfig:
    """``base`` (default: AdjustConfig()) with every adjustment option that was given; an
    empty value clears one (``--covariates ''``), and --harmonise and --harmonise-with
    each clear the other."""
    given: dict[str, Any] = {}
    if values["covariates"] is not None:
        given["covariates"] = tuple(c.strip() for c in values["covariates"].split(",") if c.strip())
    for name in ("strata", "harmonise"):
        if values[name] is not None:
            given[name] = values[name].strip() or None
    for name in ("subjects_table", "harmonise_with"):
        if values[name] is not None:
            given[name] = _path(values[name])
    if values["drop_incomplete"] is not None:
        given["drop_incomplete"] = values["drop_incomplete"]
    if given.get("harmonise"):
        given.setdefault("harmonise_with", None)
    if given.get("harmonise_with"):
        given.setdefault("harmonise", None)
    try:
        return dataclasses.replace(base or AdjustConfig(), **given)
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def _preprocess_given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing fields the options give; the backbone's preset has the rest."""
    given: dict[str, Any] = {
        "crop_margin_mm": values["crop_margin"],
        "max_voxels": values["max_voxels"],
        "mask_resample": values["mask_resample"],
    }
    window = _floats(values["hu_window"], 2, "--hu-window")
    if window is not None:
        given.update(hu_min=window[0], hu_max=window[1])
    mean_std = _floats(values["mean_std"], 2, "--mean-std")
    if mean_std is not None:
        given.update(mean=mean_std[0], std=mean_std[1])
    if values["spacing"] is not None and values["spacing"].strip() == "keep":
        given["target_spacing"] = None
    elif values["spacing"] is not None:
        d, h, w = _floats(values["spacing"], 3, "--spacing") or ()
        given["target_spacing"] = (d, h, w)
    for field in ("normalise", "axes"):
        if values[field] is not None:
            given[field] = values[field]
    return given


def layer_specs(text: str) -> tuple[str, ...]:
    """The hooked layers ``--layers`` names (comma-separated; blanks left out)."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def preprocess_config(values: Mapping[str, Any]) -> PreprocessConfig:
    """The backbone's preset with the preprocessing options given; bad values become
    click errors."""
    try:
        return PreprocessConfig.for_backbone(values["backbone"], **_preprocess_given(values))
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def run_config(values: Mapping[str, Any]) -> RunConfig:
    """Validated RunConfig from parsed options; bad values become click errors."""
    try:
        backbone = values["backbone"]
        return RunConfig(
            preprocess=preprocess_config(values),
            regions=RegionConfig(
                labels=parse_label_map(values["labels"]), background=values["background"]
            ),
            model=ModelConfig(
                backbone=backbone,
                weights=values["weights"] or default_weights(backbone),
                seed=values["seed"],
                inflation=values["inflation"],
                layers=layer_specs(values["layers"]),
                weights_sha256=values["weights_sha256"],
                precision=values["precision"],
            ),
            pooling=PoolingConfig(
                mode=values["pooling"],
                gem_p=values["gem_p"],
                min_coverage=values["min_coverage"],
            ),
            execution=ExecutionConfig(
                device=values["device"],
                executor=values["executor"],
                address=values["address"],
                num_actors=values["actors"],
                actor_cpus=values["actor_cpus"],
                loader_cpus=values["loader_cpus"],
                torch_threads=values["threads"],
                progress="quiet" if values["quiet"] else "verbose" if values["verbose"] else "auto",
                stall_timeout_s=values["stall_timeout"],
                max_retries=values["retries"],
                actor_memory_gb=values["actor_memory"],
            ),
            stats=stats_config(values),
            adjust=adjust_config(values),
        )
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None
