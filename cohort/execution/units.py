"""What a run's units of work are, and what becomes of them at the end.

:func:`cohort.execution.driver.run` streams units through the loaders and the
feature actors, keeps one part file per finished unit and hands the finished
units to a :class:`Work`'s :meth:`~Work.finish`. ``cohort run`` has one unit per
manifest subject (:class:`SubjectRun`); ``cohort robustness``
(:mod:`cohort.execution.robustness`) has K + 1 per subject, its perturbations.
A unit looks like a subject to the driver: its own id, its own resume key, its
own error row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cohort.config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

    from cohort.inputs.manifest import Subject
    from cohort.outputs import store

__all__ = ["SubjectRun", "Work"]


class Work(Protocol):
    """How a run cuts its manifest into units and what it makes of them."""

    def units(
        self, subjects: tuple[Subject, ...], cfg: RunConfig
    ) -> tuple[tuple[Subject, ...], list[dict[str, Any]]]:
        """The units (each a subject to the driver, with a unique id) and their stream rows."""
        ...

    def note(self, row: Mapping[str, Any]) -> None:
        """A result row as it arrives (once per unit: done, cached or failed)."""
        ...

    def finish(
        self,
        out_dir: Path,
        parts: store.Parts,
        keys: Sequence[str],
        errors: Sequence[Mapping[str, str]],
        cfg: RunConfig,
        provenance: Mapping[str, Any],
        cohorts: Sequence[str],
        columns: Any = None,
    ) -> pd.DataFrame:
        """Write the outputs from the finished units' parts (``keys``, in unit order) and
        the error rows; ``columns``: the subjects' covariates, strata and batch (None
        unadjusted). Returns the origin study's table."""
        ...


class SubjectRun:
    """``cohort run``: one unit per manifest subject, reduced by
    :func:`cohort.execution.reduce.finish`."""

    def units(
        self, subjects: tuple[Subject, ...], cfg: RunConfig
    ) -> tuple[tuple[Subject, ...], list[dict[str, Any]]]:
        from cohort.execution.plan import stream_rows

        return subjects, stream_rows(subjects, cfg)

    def note(self, row: Mapping[str, Any]) -> None:
        return None

    def finish(
        self,
        out_dir: Path,
        parts: store.Parts,
        keys: Sequence[str],
        errors: Sequence[Mapping[str, str]],
        cfg: RunConfig,
        provenance: Mapping[str, Any],
        cohorts: Sequence[str],
        columns: Any = None,
    ) -> pd.DataFrame:
        from cohort.execution.reduce import finish

        return finish(
            out_dir, parts, keys, errors, cfg, provenance, cohorts=cohorts, columns=columns
        )
