"""The ``cohort`` command line: the click group, with one module per command.

Every module here is a thin shell: it parses options into typed configs
(:mod:`cohort.cli.options`), calls the core, prints, and exits with the
status of :class:`cohort.errors.ExitCode`. Importing the group imports
neither torch nor pandas, so ``cohort --help`` is fast; each command imports
what it needs when it runs.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import click

from cohort.cli import cluster, demo, manifest, report, robustness, run, stats, validate
from cohort.errors import ExitCode

__all__ = ["entry", "main"]


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


def entry() -> None:
    """The ``cohort`` console script: :func:`main`, and after Ctrl-C an exit at once.

    By the time an interrupted command exits, what it keeps is on disk (whole part
    files), its message is printed and the output folder's lock is released; what is
    left is the interpreter tearing torch down, which took 1.6 s idle and up to
    13 s on a loaded 2-core machine. That is skipped (``os._exit``), after the
    process's connection to a Ray it joined is closed.
    """
    try:
        main()
    except SystemExit as stop:
        if stop.code != ExitCode.INTERRUPTED:
            raise
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ExitCode.INTERRUPTED)
