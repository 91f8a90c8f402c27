"""``cohort stats``: recompute the statistics of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cohort.cli import options
from cohort.cli.common import reported
from cohort.cli.run import format_origin

__all__ = ["stats"]


@click.command("stats")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@options.apply(options.STATS_OPTIONS)
def stats(folder: Path, **values: Any) -> None:
    """Recompute stats.parquet/csv and similarity.csv of a finished run in FOLDER.

    Every setting is the run's own (from its run.json) unless an option gives
    another; run.json is updated to say what the new statistics used. Refused
    while another cohort command writes into FOLDER.
    """
    from cohort.execution.reduce import restate
    from cohort.outputs.lock import hold
    from cohort.outputs.provenance import read_run, saved_stats_config

    with reported(), hold(folder, ["cohort", "stats", str(folder)]):
        cfg = options.stats_config(values, base=saved_stats_config(read_run(folder)))
        origin = restate(folder, cfg)
    click.echo(format_origin(origin))
