"""``cohort report``: the HTML report of a finished run."""

from __future__ import annotations

from pathlib import Path

import click

from cohort.cli.common import reported

__all__ = ["report"]


@click.command("report")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Report folder [default: FOLDER/report].",
)
def report(folder: Path, out: Path | None) -> None:
    """Write report.html and its figures (PNG + SVG) for the finished run in FOLDER."""
    from cohort.report import write_report

    with reported():
        path = write_report(folder, out)
    click.echo(f"report: {path}")
