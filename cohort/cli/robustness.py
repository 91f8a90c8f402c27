"""``cohort robustness``: the run's options plus the perturbations; prints the ICC table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cohort.cli import options
from cohort.cli.common import fail
from cohort.cli.run import NO_REPORT, format_origin, write_report_or_warn
from cohort.config import RunConfig
from cohort.errors import CohortError, ConfigError, ExitCode
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

ROBUSTNESS_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--perturbations",
        type=int,
        default=_P.count,
        show_default=True,
        help="K perturbed versions of every subject (K + 1 forward passes with the original).",
    ),
    click.option(
        "--chain",
        default=",".join(_P.chain),
        show_default=True,
        help=f"Components, any of {','.join(COMPONENTS)} (applied in that order); the default "
        "is Zwanenburg et al. 2019's best chain.",
    ),
    click.option(
        "--perturbation-seed",
        type=int,
        default=_P.seed,
        show_default=True,
        help="Seed of every draw (with the subject's id and the perturbation's index); "
        "--seed stays the seed of random weights.",
    ),
    click.option(
        "--shift",
        type=float,
        default=_P.shift_voxels,
        show_default=True,
        help="translate: uniform in [-S, S] voxels along each image axis.",
    ),
    click.option(
        "--angle",
        type=float,
        default=_P.angle_deg,
        show_default=True,
        help="rotate: uniform in [-A, A] degrees about a random axis through the regions' "
        "centroid.",
    ),
    click.option(
        "--volume-change",
        default=f"{_P.volume_low:g},{_P.volume_high:g}",
        show_default=True,
        help="volume: LOW,HIGH fraction; every region grown or shrunk by one draw, exact in "
        "voxels.",
    ),
    click.option(
        "--contour-mm",
        type=float,
        default=_P.contour_mm,
        show_default=True,
        help="contour: the band around each boundary that is redrawn (volume kept to the voxel).",
    ),
    click.option(
        "--noise-scale",
        type=float,
        default=_P.noise_scale,
        show_default=True,
        help="noise: Gaussian SD = this x the image's own noise level (wavelet MAD estimate).",
    ),
    click.option(
        "--icc-threshold",
        type=float,
        default=_R.threshold,
        show_default=True,
        help="A cosine is robust when the lower 95 % bound of its ICC(1,1) reaches this.",
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
    import pandas as pd

    from cohort.execution import driver
    from cohort.execution.robust_tables import ROBUSTNESS_FILE
    from cohort.execution.robustness import Robustness

    try:
        result = driver.run(manifest, out, cfg, download=download, work=Robustness(robust, out))
    except click.BadParameter as err:
        fail(err, ExitCode.UNUSABLE)
    except CohortError as err:
        fail(err)
    click.echo(f"weights: {result.weights}")
    if result.origin is not None:
        click.echo(format_origin(result.origin))
    if (out / ROBUSTNESS_FILE).is_file():
        click.echo(format_icc(pd.read_parquet(out / ROBUSTNESS_FILE)))
    k = robust.perturb.count
    click.echo(
        f"{result.done} done, {result.cached} reused, {result.failed} failed of "
        f"{result.subjects} units ({result.subjects // (k + 1)} subjects x {k + 1}: the "
        f"original and {k} perturbations) in {result.seconds:.1f} s -> {out}"
        + (f", {result.where()}" if result.where() else "")
    )
    for error in result.errors:
        click.echo(
            f"  failed {error['subject_id']} at {error['stage']}: {error['message']}", err=True
        )
    if report:
        write_report_or_warn(out)
    return result.exit_code


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
