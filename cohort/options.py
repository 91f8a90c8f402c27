"""Command-line options shared by ``cohort run``, ``cohort demo`` and ``jobs/analyze.py``.

One definition of each option; :func:`run_config` turns the parsed values into
a validated :class:`~cohort.config.RunConfig`, once, at the edge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from cohort.config import (
    DEFAULT_LAYERS,
    POOLING_MODES,
    ExecutionConfig,
    ModelConfig,
    PoolingConfig,
    PreprocessConfig,
    RegionConfig,
    RunConfig,
    StatsConfig,
    format_label_map,
    parse_label_map,
)
from cohort.errors import ConfigError
from cohort.model.network import BACKBONES

F = TypeVar("F", bound=Callable[..., Any])


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


STATS_OPTIONS: list[Callable[[F], F]] = [
    click.option("--bootstrap", default=2000, show_default=True, help="Bootstrap resamples."),
    click.option(
        "--permutations", default=999, show_default=True, help="Permutations of the feature test."
    ),
    click.option("--stats-seed", default=0, show_default=True, help="Seed of every resampling."),
    click.option("--min-n", default=3, show_default=True, help="Fewest subjects per group."),
    click.option(
        "--centre/--raw",
        default=False,
        show_default=True,
        help="Subtract the cohort-wide mean vector per layer before cosine (raw keeps the "
        "origin study's numbers comparable).",
    ),
]

RUN_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--labels",
        default=format_label_map(RegionConfig().labels),
        show_default=True,
        help="Named label values NAME=INT,...; a manifest 'labels' cell overrides per row.",
    ),
    click.option(
        "--background/--no-background",
        default=True,
        show_default=True,
        help="Add the region 'background' (every voxel in no named label).",
    ),
    click.option(
        "--layers",
        default=",".join(DEFAULT_LAYERS),
        show_default=True,
        help="conv-K (K-th conv from the end, in execution order) or module paths.",
    ),
    click.option(
        "--pooling",
        type=click.Choice(POOLING_MODES),
        default="masked-pool",
        show_default=True,
        help="masked-pool: one pass, mask-weighted mean; masked-input: origin protocol.",
    ),
    click.option("--gem-p", default=3.0, show_default=True, help="GeM exponent (masked-gem)."),
    click.option(
        "--min-coverage",
        default=0.01,
        show_default=True,
        help="Least region weight, in grid cells, a hooked layer must see.",
    ),
    click.option(
        "--weights",
        default="imagenet",
        show_default=True,
        help="imagenet (torchvision's cache), random (seeded) or PATH to a state dict.",
    ),
    click.option("--weights-sha256", default=None, help="Expected sha256 of the weights file."),
    click.option(
        "--backbone", type=click.Choice(sorted(BACKBONES)), default="densenet121", show_default=True
    ),
    click.option("--seed", default=0, show_default=True, help="Seed of random weights."),
    click.option(
        "--inflation", type=click.Choice(["mean", "centre"]), default="mean", show_default=True
    ),
    click.option(
        "--precision",
        type=click.Choice(["fp32", "bf16"]),
        default="fp32",
        show_default=True,
        help="bf16: autocast the network on CUDA (faster; vectors differ from fp32 by about "
        "1e-2 relative). CUDA only.",
    ),
    click.option("--hu-window", default="-1000,2000", show_default=True, help="HU clip LOW,HIGH."),
    click.option("--spacing", default=None, help="Resample to D,H,W mm (default: keep)."),
    click.option("--crop-margin", type=float, default=None, help="Crop to labels + mm margin."),
    click.option(
        "--max-voxels",
        default=PreprocessConfig().max_voxels,
        show_default=True,
        help="Refuse larger volumes before reading them.",
    ),
    click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
    ),
    click.option("--address", default=None, help="Ray cluster address (default: local)."),
    click.option("--actors", type=int, default=None, help="Feature actors (default: GPUs or 1)."),
    click.option("--actor-cpus", default=0.25, show_default=True, help="CPUs per actor."),
    click.option("--loader-cpus", default=0.5, show_default=True, help="CPUs per load task."),
    click.option("--threads", type=int, default=None, help="Torch threads per CPU actor."),
    click.option(
        "--actor-memory",
        default=2.0,
        show_default=True,
        help="GB of memory each actor reserves (raise for large volumes).",
    ),
    click.option(
        "--stall-timeout",
        type=float,
        default=None,
        help="Abort after this many s without progress.",
    ),
    click.option("--retries", default=2, show_default=True, help="Retries after a worker dies."),
    click.option("--quiet", is_flag=True, help="No per-subject progress lines."),
    *STATS_OPTIONS,
]


def apply(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def stats_config(values: dict[str, Any]) -> StatsConfig:
    return StatsConfig(
        bootstrap=values["bootstrap"],
        permutations=values["permutations"],
        seed=values["stats_seed"],
        min_n=values["min_n"],
        centre=values["centre"],
    )


def run_config(values: dict[str, Any]) -> RunConfig:
    """Validated RunConfig from parsed options; bad values become click errors."""
    try:
        window = _floats(values["hu_window"], 2, "--hu-window")
        spacing = _floats(values["spacing"], 3, "--spacing")
        if window is None:
            raise click.BadParameter("--hu-window is required")
        return RunConfig(
            preprocess=PreprocessConfig(
                hu_min=window[0],
                hu_max=window[1],
                target_spacing=(spacing[0], spacing[1], spacing[2]) if spacing else None,
                crop_margin_mm=values["crop_margin"],
                max_voxels=values["max_voxels"],
            ),
            regions=RegionConfig(
                labels=parse_label_map(values["labels"]), background=values["background"]
            ),
            model=ModelConfig(
                backbone=values["backbone"],
                weights=values["weights"],
                seed=values["seed"],
                inflation=values["inflation"],
                layers=tuple(x.strip() for x in values["layers"].split(",") if x.strip()),
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
                address=values["address"],
                num_actors=values["actors"],
                actor_cpus=values["actor_cpus"],
                loader_cpus=values["loader_cpus"],
                torch_threads=values["threads"],
                progress=not values["quiet"],
                stall_timeout_s=values["stall_timeout"],
                max_retries=values["retries"],
                actor_memory_gb=values["actor_memory"],
            ),
            stats=stats_config(values),
        )
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None
