"""How every command fails: one message on stderr and the error's exit status."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click

from cohort.errors import CohortError, ExitCode

__all__ = ["command_line", "fail", "reported"]


def fail(err: BaseException, code: ExitCode | None = None) -> NoReturn:
    """Print ``error: <err>`` and exit with ``code`` (default: the error's own status)."""
    click.echo(f"error: {err}", err=True)
    status = code if code is not None else getattr(err, "exit_code", ExitCode.UNUSABLE)
    sys.exit(int(status))


@contextmanager
def reported() -> Iterator[None]:
    """Turn a :class:`~cohort.errors.CohortError` into its message and exit status."""
    try:
        yield
    except CohortError as err:
        fail(err)


def command_line() -> list[str]:
    """This process's command line as its user typed it (``cohort run ...``, a job
    script's), for the record of who holds an output folder."""
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
