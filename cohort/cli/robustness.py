"""``cohort robustness``: the run's options plus the perturbations; prints the ICC table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cohort.cli import options
from cohort.cli.run import NO_REPORT, execute
from cohort.config import RunConfig
from cohort.errors import ConfigError, ExitCode
from cohort.inputs.chain_config import (
    COMPONENTS,
    PerturbationConfig,
    RobustnessConfig,
    parse_chain,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ROBUSTNESS_OPTIONS", "execute_robustness", "format_icc", "robustness"]

F = TypeVar("F", bound=Callable[..., Any])
_P, _R = PerturbationConfig(), RobustnessConfig()


def _shown(flag: str, default: Any, text: str, **extra: Any) -> Callable[[F], F]:
    return click.option(flag, default=default, show_default=True, help=text, **extra)


ROBUSTNESS_OPTIONS: list[Callable[[F], F]] = [
    _shown(
        "--perturbations",
        _P.count,
        "K perturbed versions of every subject (K + 1 forward passes with the original).",
    ),
    _shown(
        "--chain",
        ",".join(_P.chain),
        f"Components, any of {','.join(COMPONENTS)} (applied in that order); the default is "
        "Zwanenburg et al. 2019's best chain.",
    ),
    _shown(
        "--perturbation-seed",
        _P.seed,
        "Seed of every draw (with the subject's id and the perturbation's index); --seed "
        "stays the seed of random weights.",
    ),
    _shown("--shift", _P.shift_voxels, "translate: uniform in [-S, S] voxels along each axis."),
    _shown(
        "--angle",
        _P.angle_deg,
        "rotate: uniform in [-A, A] degrees about a random axis through the regions' centroid.",
    ),
    _shown(
        "--volume-change",
        f"{_P.volume_low:g},{_P.volume_high:g}",
        "volume: LOW,HIGH fraction; every region grown or shrunk by one draw, exact in voxels.",
    ),
    _shown(
        "--contour-mm",
        _P.contour_mm,
        "contour: the band around each boundary that is redrawn (volume kept to the voxel).",
    ),
    _shown(
        "--noise-scale",
        _P.noise_scale,
        "noise: Gaussian SD = this x the image's own noise level (wavelet MAD estimate).",
    ),
    _shown(
        "--icc-threshold",
        _R.threshold,
        "A cosine is robust when the lower 95 % bound of its ICC(1,1) reaches this.",
    ),
]


def robustness_config(values: Mapping[str, Any]) -> RobustnessConfig:
    """A validated :class:`RobustnessConfig` from parsed options (bad values: click errors)."""
    try:
        low, high = (float(v) for v in str(values["volume_change"]).split(","))
    except ValueError:
        raise click.BadParameter(
            f"--volume-change must be LOW,HIGH fractions, got {values['volume_change']!r}"
        ) from None
    try:
        perturb = PerturbationConfig(
            chain=parse_chain(values["chain"]),
            count=values["perturbations"],
            seed=values["perturbation_seed"],
            shift_voxels=values["shift"],
            angle_deg=values["angle"],
            volume_low=low,
            volume_high=high,
            contour_mm=values["contour_mm"],
            noise_scale=values["noise_scale"],
        )
        return RobustnessConfig(perturb=perturb, threshold=values["icc_threshold"])
    except ConfigError as err:
        raise click.BadParameter(str(err)) from None


def format_icc(table: pd.DataFrame) -> str:
    """The ICC table: one line per cosine, ICC(1,1) with its CI and whether it is robust."""
    if table.empty:
        return "(no ICCs: no subject finished)"
    first = table.iloc[0]
    lines = [
        f"ICC(1,1) of each cosine over {first['n_subjects']} subjects x "
        f"{first['n_perturbations']} perturbations ({first['n_excluded']} subject(s) left out); "
        f"robust: lower 95 % bound >= {first['threshold']:g}",
        f"{'layer':<8}  {'pair':<22}  {'ICC':>7}  {'95 % CI':>17}  robust",
    ]
    for row in table.itertuples():
        pair = f"{row.region_a}-{row.region_b}"
        if row.status != "ok":
            lines.append(f"{row.layer:<8}  {pair:<22}  skipped: {row.reason}")
            continue
        ci = f"[{row.icc_low:.3f}, {row.icc_high:.3f}]"
        robust = "yes" if row.robust else "no"
        lines.append(f"{row.layer:<8}  {pair:<22}  {row.icc:>7.3f}  {ci:>17}  {robust}")
    return "\n".join(lines)


def execute_robustness(
    manifest: Path,
    out: Path,
    cfg: RunConfig,
    robust: RobustnessConfig,
    *,
    download: bool = True,
    report: bool = True,
) -> ExitCode:
    """Run ``cohort robustness``, print the originals' table and the ICCs; the exit status."""
    from cohort.execution.robustness import Robustness

    k = robust.perturb.count

    def units(count: int) -> str:
        return (
            f"{count} units ({count // (k + 1)} subjects x {k + 1}: the original and "
            f"{k} perturbations)"
        )

    work = Robustness(robust, out)
    return execute(
        manifest, out, cfg, download=download, report=report, work=work, tables=_iccs, units=units
    )


def _iccs(out: Path) -> str:
    import pandas as pd

    from cohort.execution.robust_tables import ROBUSTNESS_FILE

    path = out / ROBUSTNESS_FILE
    return format_icc(pd.read_parquet(path)) if path.is_file() else "(no ICCs were written)"


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@options.apply(options.RUN_OPTIONS)
@options.apply(ROBUSTNESS_OPTIONS)
@NO_REPORT
def robustness(manifest: Path, out: Path, no_report: bool, **values: Any) -> None:
    """Test-retest stability of every cosine: each subject of MANIFEST and K perturbed
    versions of it (noise, shift, rotation, volume, contour), ICCs per cosine and channel.

    Writes the usual outputs of the originals plus robustness_similarity.parquet,
    robustness.parquet/.csv, robustness_channels.parquet/.csv and
    robustness_errors.parquet/.csv; reruns reuse every finished (subject, perturbation).
    """
    robust = robustness_config(values)
    cfg = options.run_config(values)
    sys.exit(execute_robustness(manifest, out, cfg, robust, report=not no_report))
