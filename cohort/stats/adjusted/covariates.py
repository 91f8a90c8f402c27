"""Per-subject covariates, strata and batch: typed once, checked once, with clear errors.

Values arrive as text (manifest cells, a subjects table) and are typed here:

- a covariate whose every present value reads as a finite number is
  *continuous*; any other covariate is *categorical*, with its levels in sorted
  order and the first as the reference level (its dummy is left out of the
  design). The strata and batch columns are always categorical.
- a value is missing when its cell is blank or reads ``NA``, ``NaN``, ``null``
  or ``None`` (any case). A subject with a missing value is an error naming the
  subjects and the column, unless ``drop_incomplete``: then it is left out of
  every test that needs the column, and each such row counts it in its note.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from cohort.config import AdjustConfig
from cohort.errors import StatsInputError
from cohort.stats.common import FloatArray, IntArray

__all__ = ["MISSING_TEXT", "Covariate", "SubjectTable", "design_columns", "subject_table"]

MISSING_TEXT: Final = frozenset({"", "na", "nan", "null", "none"})
_SHOWN: Final = 10  # subjects named in a message before "and N more"

Kind = Literal["continuous", "categorical"]


@dataclass(frozen=True)
class Covariate:
    """One typed column: its name, kind and (categorical) levels, reference first."""

    name: str
    kind: Kind
    levels: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """What run.json records of the column."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind}
        if self.kind == "categorical":
            out["levels"] = list(self.levels)
            out["reference"] = self.levels[0] if self.levels else None
        return out


@dataclass(frozen=True)
class SubjectTable:
    """The typed columns of the subjects, keyed by id.

    ``values[name]`` is float64 (NaN = missing) for a continuous column and int64
    codes into ``levels`` (-1 = missing) for a categorical one.
    """

    ids: npt.NDArray[np.object_]
    covariates: tuple[Covariate, ...]
    values: Mapping[str, npt.NDArray[Any]]
    kinds: Mapping[str, Covariate]  # every typed column (covariates, strata, batch)
    strata: str | None = None
    batch: str | None = None
    drop_incomplete: bool = False
    source: str = ""
    _index: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.covariates)

    @property
    def label(self) -> str:
        """The ``adjusted_for`` text: the covariates joined by ``+``, in the order given."""
        return "+".join(self.names)

    def rows(self, ids: Sequence[str] | npt.NDArray[Any]) -> IntArray:
        """Row of each id in the table (-1 for an id the table does not hold)."""
        return np.array([self._index.get(str(i), -1) for i in ids], dtype=np.int64)

    def column(self, name: str, rows: IntArray) -> npt.NDArray[Any]:
        """``name``'s values at ``rows`` (missing where a row is -1)."""
        values = self.values[name]
        missing: Any = np.nan if values.dtype.kind == "f" else -1
        out = np.where(rows >= 0, values[np.maximum(rows, 0)], missing)
        return out.astype(values.dtype, copy=False)

    def complete(self, rows: IntArray, names: Sequence[str]) -> npt.NDArray[np.bool_]:
        """Whether each row has a value in every column of ``names``."""
        ok = rows >= 0
        for name in names:
            values = self.column(name, rows)
            ok &= ~np.isnan(values) if values.dtype.kind == "f" else values >= 0
        return ok

    def describe(self) -> dict[str, Any]:
        """run.json's ``covariates``: each covariate's type and levels, strata, batch."""
        return {
            "covariates": [c.describe() for c in self.covariates],
            "adjusted_for": self.label,
            "strata": None if self.strata is None else self.kinds[self.strata].describe(),
            "harmonise": None if self.batch is None else self.kinds[self.batch].describe(),
            "drop_incomplete": self.drop_incomplete,
            "source": self.source,
        }


def _missing(cell: object) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float) and math.isnan(cell):
        return True
    return str(cell).strip().lower() in MISSING_TEXT


def _number(cell: object) -> float | None:
    try:
        return float(str(cell).strip())
    except ValueError:
        return None


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def _type_column(
    name: str, cells: Sequence[object], ids: Sequence[str], numeric_allowed: bool, source: str
) -> tuple[Covariate, npt.NDArray[Any]]:
    missing = np.array([_missing(c) for c in cells], dtype=bool)
    present = [c for c, m in zip(cells, missing, strict=True) if not m]
    numbers = [_number(c) for c in present]
    if numeric_allowed and present and all(v is not None for v in numbers):
        bad = [
            sid
            for sid, c, m in zip(ids, cells, missing, strict=True)
            if not m and not math.isfinite(float(str(c).strip()))
        ]
        if bad:
            raise StatsInputError(
                f"column {name!r} of {source} is numeric but holds a non-finite value for "
                f"subject(s) {_named(bad)}; give a finite number, or leave the cell blank "
                "(missing) and use --drop-incomplete"
            )
        values = np.full(len(cells), np.nan)
        values[~missing] = [float(str(c).strip()) for c in present]
        return Covariate(name, "continuous"), values
    text = [str(c).strip() for c in present]
    levels = tuple(sorted(set(text)))
    codes = np.full(len(cells), -1, dtype=np.int64)
    lookup = {level: i for i, level in enumerate(levels)}
    codes[~missing] = [lookup[t] for t in text]
    return Covariate(name, "categorical", levels), codes


def subject_table(
    ids: Sequence[str],
    columns: Mapping[str, Sequence[object]],
    cfg: AdjustConfig,
    source: str,
    *,
    needed: Sequence[str] = (),
    run_ids: Sequence[str] | None = None,
    check_constant: bool = True,
) -> SubjectTable:
    """Type and check the columns ``cfg`` names (plus ``needed``) for the subjects ``ids``.

    Parameters
    ----------
    ids : sequence of str
        Subject ids, one per cell of each column.
    columns : mapping of str to sequence
        The available columns (cells as text or numbers), where ``source`` has them.
    cfg : AdjustConfig
        Which columns are covariates, strata and batch, and ``drop_incomplete``.
    source : str
        Where the columns come from, for messages (``manifest m.csv``).
    needed : sequence of str
        Further columns a fitted harmonisation model needs (its preserved terms).
    run_ids : sequence of str, optional
        The subjects the run analyses; each must have a value in every column,
        unless ``cfg.drop_incomplete``. Default: ``ids``.
    check_constant : bool
        Refuse a covariate with one value over all ``run_ids`` (it can adjust
        nothing). Within one test such a covariate is left out with a note.

    Returns
    -------
    SubjectTable

    Raises
    ------
    StatsInputError
        A named column that ``source`` lacks, a missing value without
        ``drop_incomplete`` (naming the subjects and the column), a non-finite
        number, or a constant covariate.
    """
    wanted = list(dict.fromkeys([*cfg.columns(), *needed]))
    unknown = [name for name in wanted if name not in columns]
    if unknown:
        have = ", ".join(sorted(columns)) or "none besides the manifest's own"
        raise StatsInputError(
            f"column(s) {', '.join(repr(n) for n in unknown)} named by --covariates, --strata "
            f"or --harmonise are not in {source} (its other columns: {have}); add them there, "
            "or give a subjects table (--subjects-table FILE: subject_id plus the columns)"
        )
    index = {str(sid): i for i, sid in enumerate(ids)}
    wanted_ids = [str(s) for s in (ids if run_ids is None else run_ids)]
    rows = np.array([index.get(s, -1) for s in wanted_ids], dtype=np.int64)
    kinds: dict[str, Covariate] = {}
    values: dict[str, npt.NDArray[Any]] = {}
    numeric = set(cfg.covariates) | (set(needed) - {cfg.strata, cfg.harmonise})
    for name in wanted:
        kind, column = _type_column(
            name, columns[name], [str(i) for i in ids], name in numeric, source
        )
        kinds[name], values[name] = kind, column
        at = np.where(
            rows >= 0, column[np.maximum(rows, 0)], np.nan if kind.kind == "continuous" else -1
        )
        absent = (rows < 0) | (np.isnan(at) if kind.kind == "continuous" else at < 0)
        if absent.any() and not cfg.drop_incomplete:
            lacking = [s for s, a in zip(wanted_ids, absent, strict=True) if a]
            raise StatsInputError(
                f"{len(lacking)} subject(s) have no value of {name!r} in {source}: "
                f"{_named(lacking)}; fill the values in, or pass --drop-incomplete to leave "
                "these subjects out of the tests that need the column (each row counts them)"
            )
        if check_constant and name in cfg.covariates:
            seen = np.unique(at[~absent])
            if seen.size == 1:
                shown = kind.levels[int(seen[0])] if kind.levels else f"{float(seen[0]):g}"
                raise StatsInputError(
                    f"covariate {name!r} has one value ({shown}) for every subject of the run "
                    f"in {source}, so it cannot adjust anything; drop it from --covariates"
                )
    return SubjectTable(
        ids=np.asarray([str(i) for i in ids], dtype=object),
        covariates=tuple(kinds[name] for name in cfg.covariates),
        values=values,
        kinds=kinds,
        strata=cfg.strata,
        batch=cfg.harmonise,
        drop_incomplete=cfg.drop_incomplete,
        source=source,
        _index=index,
    )


def design_columns(
    table: SubjectTable, rows: IntArray, names: Sequence[str]
) -> list[tuple[str, FloatArray]]:
    """The design columns of covariates ``names`` at ``rows`` (complete rows only):
    a continuous covariate standardised (mean 0, sd 1; F is unchanged by it, the fits
    are better conditioned), a categorical one as 0/1 dummies of its levels present
    here except the first present (the reference)."""
    out: list[tuple[str, FloatArray]] = []
    for name in names:
        kind = table.kinds[name]
        values = table.column(name, rows)
        if kind.kind == "continuous":
            sd = float(values.std())
            centred = values - values.mean()
            out.append((name, centred / sd if sd > 0 else centred))
            continue
        present = np.unique(values)
        for code in present[1:]:
            out.append((f"{name}[{kind.levels[int(code)]}]", (values == code).astype(np.float64)))
    return out
