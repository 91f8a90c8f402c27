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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cohort.config import RunConfig

if TYPE_CHECKING:
    import pandas as pd

    from cohort.execution.adjust import Columns
    from cohort.inputs.manifest import Subject
    from cohort.outputs import store

__all__ = ["Finished", "SubjectRun", "Work"]


@dataclass(frozen=True)
class Finished:
    """What a run hands its :class:`Work` at the end: the finished units' part ``keys``
    (in unit order, with each unit's cohort in ``cohorts``), the error rows, the
    settings and record of the run, and the subjects' covariates, strata and batch
    (``columns``; None unadjusted)."""

    out_dir: Path
    parts: store.Parts
    keys: Sequence[str]
    errors: Sequence[Mapping[str, str]]
    cfg: RunConfig
    provenance: Mapping[str, Any]
    cohorts: Sequence[str]
    columns: Columns | None = None

    def reduce(self) -> pd.DataFrame:
        """The usual outputs of ``cohort run`` from these units
        (:func:`cohort.execution.reduce.finish`); returns the origin study's table."""
        from cohort.execution.reduce import finish

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return finish(**fields)


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

    def finish(self, done: Finished) -> pd.DataFrame:
        """Write the outputs of the finished units; returns the origin study's table."""
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

    def finish(self, done: Finished) -> pd.DataFrame:
        return done.reduce()
