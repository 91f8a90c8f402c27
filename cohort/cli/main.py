"""The ``cohort`` command line: the click group, with one module per command.

Every module here is a thin shell: it parses options into typed configs
(:mod:`cohort.cli.options`), calls the core, prints, and exits with the
status of :class:`cohort.errors.ExitCode`. Importing the group imports
neither torch nor pandas, so ``cohort --help`` is fast; each command imports
what it needs when it runs.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import click

from cohort.cli import cluster, demo, manifest, report, robustness, run, stats, validate

__all__ = ["main"]


@click.group()
@click.version_option(package_name="cohort")
def main() -> None:
    """Deep region features and defensible statistics for CT cohorts."""
    # `kill -USR1 PID`: every thread's stack to the process's stderr, and the run goes on
    if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


for _command in (
    run.run,
    demo.demo,
    robustness.robustness,
    validate.validate,
    manifest.manifest,
    stats.stats,
    report.report,
    cluster.submit,
    cluster.status,
    cluster.logs,
    cluster.stop,
):
    main.add_command(_command)
