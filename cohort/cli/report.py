"""``cohort report``: the HTML report of a finished run."""

from __future__ import annotations

from pathlib import Path

import click

from cohort.cli.common import command_line, reported

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
    """Write report.html and its figures (PNG + SVG) for the finished run in FOLDER.

    Refused while another cohort command writes into FOLDER, when the report goes
    there (the default).
    """
    from contextlib import nullcontext

    from cohort.outputs.lock import hold
    from cohort.report import write_report

    inside = out is None or out.resolve().is_relative_to(folder.resolve())
    with reported(), hold(folder, command_line()) if inside else nullcontext():
        path = write_report(folder, out)
    click.echo(f"report: {path}")
