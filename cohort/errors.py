"""The exception hierarchy and the exit statuses, in one place.

Every error the package raises to its callers on purpose is a :class:`CohortError`, and also
subclasses the builtin that fits, so callers can catch either. Messages name
the file or module, what was expected, what was found and the next step. Each
class carries the exit status the command line ends with when it reaches it
(:attr:`CohortError.exit_code`), so the commands have one way to fail.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

__all__ = [
    "ClusterError",
    "CohortError",
    "ConfigError",
    "CredentialsError",
    "ExitCode",
    "GeometryError",
    "InflationError",
    "InputError",
    "ManifestError",
    "ModelError",
    "OutputError",
    "RegionError",
    "ReportError",
    "RunInterruptedError",
    "StalledError",
    "StatsInputError",
    "WeightsError",
]


class ExitCode(IntEnum):
    """Exit statuses of every ``cohort`` command (and of ``jobs/analyze.py``)."""

    OK = 0  # every subject done; a cluster job SUCCEEDED
    FAILURES = 1  # failures recorded, everything else written; a job FAILED or was STOPPED
    UNUSABLE = 2  # unusable invocation, manifest, weights, address or credentials
    INTERRUPTED = 130  # Ctrl-C: finished subjects kept (rerun to continue); a job keeps running


class CohortError(Exception):
    """Base class of every deliberate error in cohort."""

    exit_code: ClassVar[ExitCode] = ExitCode.UNUSABLE


class ConfigError(CohortError, ValueError):
    """An option or configuration value is invalid."""


class ManifestError(CohortError, ValueError):
    """The manifest cannot be used (missing columns, duplicate ids, bad cells)."""


class InputError(CohortError, ValueError):
    """One subject's input files cannot be used (unreadable, wrong content)."""

    exit_code = ExitCode.FAILURES


class GeometryError(InputError):
    """Image and mask disagree on grid or orientation, or a shape is unusable."""


class RegionError(InputError):
    """A region is empty or too small for a hooked layer."""


class ModelError(CohortError, ValueError):
    """A model cannot be built, inflated or hooked as asked."""


class InflationError(ModelError):
    """A 2D module or weight could not be carried over to 3D."""


class WeightsError(ModelError):
    """Weights cannot be had, or do not match what was expected."""


class StatsInputError(CohortError, ValueError):
    """A features or similarity table cannot be used by the statistics as given."""


class OutputError(CohortError, ValueError):
    """A result folder or output file cannot be written or read back as expected."""


class ReportError(OutputError):
    """A folder cannot be reported on (not a finished run, unreadable files)."""


class RunInterruptedError(CohortError, RuntimeError):
    """The run was stopped (Ctrl-C / SIGINT); finished subjects are kept for a rerun."""

    exit_code = ExitCode.INTERRUPTED


class StalledError(CohortError, TimeoutError):
    """No subject finished within the no-progress timeout (``--stall-timeout``)."""

    exit_code = ExitCode.FAILURES


class CredentialsError(CohortError, PermissionError):
    """A Ray cluster refused the request, or no usable token was given."""


class ClusterError(CohortError, ConnectionError):
    """A Ray cluster's Jobs API cannot be reached or answered with an error."""
