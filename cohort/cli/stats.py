"""``cohort stats``: recompute the statistics of a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cohort.cli import options
from cohort.cli.common import command_line, reported
from cohort.cli.run import format_origin

__all__ = ["stats"]


@click.command("stats")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@options.apply([*options.STATS_OPTIONS, *options.ADJUST_OPTIONS])
@click.option(
    "--robust-only",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="A cohort robustness folder: test only the cosines it found robust (BH q-values "
    "over what remains; the between-features tests are left out); rows say so.",
)
def stats(folder: Path, robust_only: Path | None, **values: Any) -> None:
    """Recompute stats.parquet/csv and similarity.csv of a finished run in FOLDER.

    Every setting is the run's own (from its run.json) unless an option gives
    another; run.json is updated to say what the new statistics used. With
    --harmonise or --harmonise-with, features_harmonised.parquet, the model and
    the harmonised cosines of similarity.parquet are rewritten too; an empty
    value turns a setting off (--covariates ''). Refused while another cohort
    command writes into FOLDER.
    """
    from cohort.execution.reduce import restate
    from cohort.outputs.lock import hold
    from cohort.outputs.provenance import read_run, saved_adjust_config, saved_stats_config

    with reported(), hold(folder, command_line()):
        run = read_run(folder)
        cfg = options.stats_config(values, base=saved_stats_config(run))
        adjusted = options.adjust_config(values, base=saved_adjust_config(run))
        origin = restate(folder, cfg, adjusted, robust=robust_only)
    click.echo(format_origin(origin))
    if robust_only is not None:
        import pandas as pd

        tests = pd.read_parquet(folder / "stats.parquet")
        kept = str(tests["robust_only"].iloc[0]) if len(tests) else "no robust cosine"
        click.echo(f"--robust-only: {len(tests)} tests of {kept}")
