"""``cohort run``, the main job (``cohort demo`` runs it on a synthetic cohort)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cohort.cli import options
from cohort.cli.common import command_line, fail
from cohort.config import RunConfig
from cohort.errors import CohortError, ExitCode

if TYPE_CHECKING:
    import pandas as pd

    from cohort.execution.units import Work

__all__ = [
    "NO_REPORT",
    "execute",
    "format_origin",
    "run",
    "write_report_or_warn",
]


def format_origin(origin: pd.DataFrame) -> str:
    """The origin study's table (region pairs x layers, cohort means), one block per cohort."""
    if origin.empty:
        return "(no similarities: no subject finished)"
    layers = [c for c in origin.columns if c not in ("cosine", "cohort", "pair")]
    kind = f" ({origin['cosine'].iloc[0]} cosines)" if "cosine" in origin else ""
    blocks = []
    for cohort, rows in origin.groupby("cohort", sort=False):
        width = max(len("pair"), *(len(str(p)) for p in rows["pair"]))
        header = f"{'pair':<{width}}  " + "  ".join(f"{layer:>8}" for layer in layers)
        lines = [f"cohort {cohort}{kind}", header]
        for _, row in rows.iterrows():
            values = "  ".join(f"{row[layer]:>8.4f}" for layer in layers)
            lines.append(f"{row['pair']:<{width}}  {values}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def execute(
    manifest: Path,
    out: Path,
    cfg: RunConfig,
    *,
    download: bool = True,
    report: bool = True,
    work: Work | None = None,
    tables: Callable[[Path], str] | None = None,
    units: Callable[[int], str] = lambda count: f"{count} subjects",
) -> ExitCode:
    """Run the pipeline, print its summary and write its report, holding ``out``'s lock
    (:mod:`cohort.outputs.lock`) throughout; returns the exit status.

    ``work`` cuts the manifest into units (default: a subject each, ``cohort run``);
    ``tables`` gives more text to print after the origin study's table, from the
    output folder; ``units`` names the count of units in the summary line.
    """
    from cohort.outputs.lock import hold

    try:
        with hold(out, command_line()):
            return _execute(
                manifest,
                out,
                cfg,
                download=download,
                report=report,
                work=work,
                tables=tables,
                units=units,
            )
    except CohortError as err:  # the folder is in use, or cannot be made
        fail(err)


def _execute(
    manifest: Path,
    out: Path,
    cfg: RunConfig,
    *,
    download: bool,
    report: bool,
    work: Work | None,
    tables: Callable[[Path], str] | None,
    units: Callable[[int], str],
) -> ExitCode:
    from cohort.execution import driver

    try:
        result = driver.run(manifest, out, cfg, download=download, work=work)
    except click.BadParameter as err:
        fail(err, ExitCode.UNUSABLE)
    except CohortError as err:
        fail(err)
    click.echo(f"weights: {result.weights}")
    if result.origin is not None:
        click.echo(format_origin(result.origin))
    if tables is not None:
        click.echo(tables(out))
    click.echo(
        f"{result.done} done, {result.cached} reused, {result.failed} failed of "
        f"{units(result.subjects)} in {result.seconds:.1f} s -> {out}"
        + (f", {result.where()}" if result.where() else "")
    )
    for error in result.errors:
        click.echo(
            f"  failed {error['subject_id']} at {error['stage']}: {error['message']}", err=True
        )
    if report:
        write_report_or_warn(out)
    return result.exit_code


def write_report_or_warn(out: Path) -> None:
    """Write the report of the finished run in ``out``; a failure is a warning."""
    if not (out / "run.json").is_file():
        return
    from cohort.report import write_report

    try:
        click.echo(f"report: {write_report(out)}")
    except Exception as err:  # the results stand without their report
        click.echo(
            f"warning: the report could not be written ({err}); run `cohort report {out}` to retry",
            err=True,
        )


NO_REPORT = click.option(
    "--no-report", is_flag=True, help="Skip the HTML report (cohort report DIR makes it later)."
)


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (refused while another cohort command writes there).",
)
@options.apply(options.RUN_OPTIONS)
@NO_REPORT
def run(manifest: Path, out: Path, no_report: bool, **values: Any) -> None:
    """Extract region features for every subject in MANIFEST and test them."""
    cfg = options.run_config(values)
    sys.exit(execute(manifest, out, cfg, report=not no_report))
