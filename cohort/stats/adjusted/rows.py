"""The adjusted test rows of a run, and the unadjusted PERMANOVA within strata.

Families (``family`` column), one row per cohort pair and one over all cohorts
when there are three or more, as the unadjusted between-cohort families:

- ``between-pairs-adjusted``: per layer x region pair, ``freedman-lane``
  (:func:`~cohort.stats.adjusted.linear.freedman_lane`), ``partial-eta-squared``;
- ``between-features-adjusted``: per layer x region, ``permanova`` with the
  covariates (:func:`~cohort.stats.adjusted.margin.permanova_margin`), ``r-squared``.

Tests on the same subjects (the same cohorts, no subject left out by a NaN or a
missing value) share one set of permutations (and, for the cosines, of
bootstrap resamples): each p-value is a valid permutation p-value on its own,
and the draws are paid once. Their generator is the one of the first such test
in row order (:func:`cohort.stats.common.rng_for` with its key), so it does not
depend on any other family. ``adjusted_for`` holds the covariates joined by
``+``; a row that could not be tested says why in ``reason``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from cohort.config import StatsConfig
from cohort.outputs.schemas import pair_label
from cohort.stats.adjusted.covariates import SubjectTable
from cohort.stats.adjusted.linear import freedman_lane
from cohort.stats.adjusted.margin import permanova_margin
from cohort.stats.adjusted.model import build_design
from cohort.stats.adjusted.permute import ONE_GROUP_PER_STRATUM, strata_note
from cohort.stats.common import (
    FloatArray,
    IntArray,
    Result,
    TestRow,
    dropped_note,
    join_notes,
    rng_for,
    skipped,
    small_groups_note,
)
from cohort.stats.permanova import permanova
from cohort.stats.tables import FeatureSpace, PairKey, unit_rows

__all__ = [
    "ADJUSTED_FAMILIES",
    "AdjustedRow",
    "adjusted_feature_rows",
    "adjusted_pair_rows",
    "stratified_permanova",
]

ADJUSTED_FAMILIES: Final = ("between-pairs-adjusted", "between-features-adjusted")
_NO_CI: Final = "no CI: resampling subjects puts zero distances between copies"
_SAME_DIRECTION: Final = 1e-12  # total SS at or below this: all vectors point one way


@dataclass(frozen=True)
class AdjustedRow(TestRow):
    """One adjusted test, with the data it touches (for the sanity flags)."""

    cohorts: tuple[str, ...]
    layers: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    regions: tuple[str, ...]
    adjusted_for: str


def _groups(cohorts: Sequence[str]) -> list[tuple[str, ...]]:
    groups: list[tuple[str, ...]] = list(combinations(cohorts, 2))
    if len(cohorts) >= 3:
        groups.append(tuple(cohorts))
    return groups


@dataclass
class _Candidate:
    """A test whose subjects are known: it runs with the others on the same subjects."""

    slot: int  # its place in the output rows
    key: str  # its seed key
    ids: npt.NDArray[np.object_]
    codes: IntArray
    rows: IntArray  # rows of the subjects table
    data: FloatArray  # n x C: a cosine column, or a feature space's unit vectors
    note: str


def _prepare(
    table: SubjectTable,
    ids: npt.NDArray[np.object_],
    codes: IntArray,
    valid: npt.NDArray[np.bool_],
    what: str,
    names: Sequence[str],
    min_n: int,
) -> tuple[npt.NDArray[np.bool_], str, Result | None]:
    """Which subjects a test keeps (a value, every covariate and the stratum), its
    note, and a skipped result when too few are left."""
    rows = table.rows(ids)
    needed = [*table.names, *([table.strata] if table.strata else [])]
    complete = table.complete(rows, needed)
    keep = valid & complete
    note = join_notes(
        dropped_note(int((~valid).sum()), what),
        dropped_note(int((valid & ~complete).sum()), "a missing covariate or stratum"),
    )
    sizes = np.bincount(codes[keep], minlength=len(names))
    small = small_groups_note([int(s) for s in sizes], names, min_n)
    if small:
        return keep, note, skipped(int(keep.sum()), join_notes(note, small), below_min_n=True)
    return keep, note, None


def _by_subjects(candidates: Sequence[_Candidate]) -> list[list[_Candidate]]:
    """Candidates grouped by identical subjects, groups in order of their first member."""
    sets: dict[tuple[Any, ...], list[_Candidate]] = {}
    for candidate in candidates:
        sets.setdefault(tuple(candidate.ids.tolist()), []).append(candidate)
    return list(sets.values())


def _strata_of(
    table: SubjectTable, first: _Candidate
) -> tuple[npt.NDArray[np.int64] | None, str, str]:
    """(strata codes, note, refusal) of a set of tests on the same subjects."""
    if table.strata is None:
        return None, "", ""
    codes = table.column(table.strata, first.rows).astype(np.int64)
    note, mixed = strata_note(table.strata, codes, first.codes)
    return codes, note, "" if mixed else ONE_GROUP_PER_STRATUM


def adjusted_pair_rows(
    series: Mapping[PairKey, pd.Series],
    cohorts: Sequence[str],
    layers: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    table: SubjectTable,
    cfg: StatsConfig,
) -> list[AdjustedRow]:
    """``between-pairs-adjusted``: the Freedman-Lane test of each layer x pair x cohort group."""
    family, test, effect = ADJUSTED_FAMILIES[0], "freedman-lane", "partial-eta-squared"
    out: list[AdjustedRow] = []
    results: dict[int, Result] = {}
    candidates: list[_Candidate] = []
    empty = pd.Series(dtype=np.float64)
    groups = _groups(cohorts) if len(cohorts) >= 2 else [(c,) for c in cohorts]
    for group in groups:
        joined = "|".join(group)
        for layer, pair in product(layers, pairs):
            slot = len(out)
            label = pair_label(*pair)
            out.append(
                AdjustedRow(family, joined, layer, label, test, effect, skipped(0, ""), group,
                            (layer,), (pair,), pair, table.label)
            )  # fmt: skip
            parts = [series.get((c, layer, pair), empty) for c in group]
            if len(group) < 2:
                results[slot] = skipped(int(parts[0].notna().sum()), "one cohort")
                continue
            values = np.concatenate([p.to_numpy(dtype=np.float64) for p in parts])
            ids = np.concatenate([p.index.to_numpy(dtype=object) for p in parts])
            codes = np.repeat(np.arange(len(group)), [len(p) for p in parts]).astype(np.int64)
            keep, note, refused = _prepare(
                table, ids, codes, ~np.isnan(values), "a NaN cosine", group, cfg.min_n
            )
            if refused is not None:
                results[slot] = refused
                continue
            if np.ptp(values[keep]) == 0:
                results[slot] = skipped(int(keep.sum()), join_notes(note, "all values are equal"))
                continue
            key = f"{family}|{joined}|{layer}|{label}|{test}"
            candidates.append(
                _Candidate(slot, key, ids[keep], codes[keep], table.rows(ids[keep]),
                           values[keep].reshape(-1, 1), note)
            )  # fmt: skip
    for members in _by_subjects(candidates):
        first = members[0]
        names = out[first.slot].cohorts
        design = build_design(table, first.rows, first.codes, names)
        strata, strata_text, strata_refusal = _strata_of(table, first)
        refusal = design.refusal or strata_refusal
        n = int(first.ids.size)
        if refusal:
            for c in members:
                results[c.slot] = skipped(n, join_notes(c.note, design.note, refusal))
            continue
        marginal, eta, ci = freedman_lane(
            design,
            np.hstack([c.data for c in members]),
            first.codes,
            permutations=cfg.permutations,
            bootstrap=cfg.bootstrap,
            rng=rng_for(cfg.seed, first.key),
            level=cfg.ci_level,
            strata=strata,
        )
        p_values = marginal.p_value
        for j, c in enumerate(members):
            no_ci = (
                "no CI: no bootstrap resample gave a defined partial eta squared"
                if cfg.bootstrap > 0 and not np.isfinite(ci[j][0])
                else ""
            )
            note = join_notes(c.note, design.note, strata_text, no_ci)
            if cfg.permutations < 1:
                results[c.slot] = skipped(n, join_notes(note, "permutations is 0"))
                continue
            results[c.slot] = Result(
                n, float(marginal.f[j]), float(p_values[j]), float(eta[j]), ci[j][0], ci[j][1],
                "ok", note,
            )  # fmt: skip
    return [_with(row, results[i]) for i, row in enumerate(out)]


def _with(row: AdjustedRow, result: Result) -> AdjustedRow:
    return AdjustedRow(
        row.family, row.cohort, row.layer, row.pair, row.test, row.effect_name, result,
        row.cohorts, row.layers, row.pairs, row.regions, row.adjusted_for,
    )  # fmt: skip


def adjusted_feature_rows(
    spaces: Sequence[FeatureSpace], table: SubjectTable, cfg: StatsConfig
) -> list[AdjustedRow]:
    """``between-features-adjusted``: PERMANOVA by margin per layer x region x cohort group."""
    family, test, effect = ADJUSTED_FAMILIES[1], "permanova", "r-squared"
    out: list[AdjustedRow] = []
    results: dict[int, Result] = {}
    candidates: list[_Candidate] = []
    for space in spaces:
        present = sorted(set(space.cohorts.tolist()))
        groups = _groups(present) if len(present) >= 2 else [(c,) for c in present]
        for group in groups:
            joined = "|".join(group)
            slot = len(out)
            out.append(
                AdjustedRow(family, joined, space.layer, space.region, test, effect,
                            skipped(0, ""), group, (space.layer,), (), (space.region,),
                            table.label)
            )  # fmt: skip
            if len(group) < 2:
                results[slot] = skipped(int(space.ids.size), "one cohort")
                continue
            inside = np.isin(space.cohorts, group)
            ids = space.ids[inside]
            codes = pd.Index(group).get_indexer(pd.Index(space.cohorts[inside])).astype(np.int64)
            unit, valid = unit_rows(space.vectors[inside])
            keep, note, refused = _prepare(
                table, ids, codes, valid, "a zero-norm or non-finite vector", group, cfg.min_n
            )
            if refused is not None:
                results[slot] = refused
                continue
            key = f"{family}|{joined}|{space.layer}|{space.region}|{test}"
            candidates.append(
                _Candidate(slot, key, ids[keep], codes[keep], table.rows(ids[keep]),
                           unit[keep], note)
            )  # fmt: skip
    for members in _by_subjects(candidates):
        first = members[0]
        n = int(first.ids.size)
        design = build_design(table, first.rows, first.codes, out[first.slot].cohorts)
        strata, strata_text, strata_refusal = _strata_of(table, first)
        no_permutations = "permutations is 0" if cfg.permutations < 1 else ""
        refusal = design.refusal or strata_refusal or no_permutations
        if refusal:
            for c in members:
                results[c.slot] = skipped(n, join_notes(c.note, design.note, refusal))
            continue
        marginal, r_squared = permanova_margin(
            design,
            [c.data for c in members],
            permutations=cfg.permutations,
            rng=rng_for(cfg.seed, first.key),
            strata=strata,
        )
        nan = float("nan")
        for j, c in enumerate(members):
            note = join_notes(c.note, design.note, strata_text)
            if marginal.ss_total[j] <= _SAME_DIRECTION:
                why = "all vectors point the same way (zero distances)"
                results[c.slot] = skipped(n, join_notes(note, why))
                continue
            results[c.slot] = Result(
                n, float(marginal.f[j]), float(marginal.p_value[j]), float(r_squared[j]), nan,
                nan, "ok", join_notes(note, _NO_CI),
            )  # fmt: skip
    return [_with(row, results[i]) for i, row in enumerate(out)]


def stratified_permanova(table: SubjectTable, cfg: StatsConfig) -> Callable[..., Result]:
    """The unadjusted PERMANOVA of :mod:`cohort.stats.permanova` with its permutations
    within the strata of ``table.strata``: a callable taking (vectors, codes, ids,
    names, rng) as :func:`cohort.stats.families.run_tests` has them."""
    column = table.strata or ""

    def run(
        vectors: FloatArray,
        codes: IntArray,
        ids: npt.NDArray[np.object_],
        names: Sequence[str],
        rng: np.random.Generator,
    ) -> Result:
        rows = table.rows(ids)
        complete = table.complete(rows, [column])
        note = dropped_note(int((~complete).sum()), "a missing stratum")
        sizes = np.bincount(codes[complete], minlength=len(names))
        if (sizes == 0).any():
            small = small_groups_note([int(v) for v in sizes], names, cfg.min_n)
            return skipped(int(complete.sum()), join_notes(note, small), below_min_n=True)
        strata = table.column(column, rows[complete]).astype(np.int64)
        text, mixed = strata_note(column, strata, codes[complete])
        if not mixed:
            return skipped(int(complete.sum()), join_notes(note, ONE_GROUP_PER_STRATUM))
        result = permanova(
            vectors[complete],
            codes[complete],
            min_n=cfg.min_n,
            permutations=cfg.permutations,
            rng=rng,
            names=names,
            strata=strata,
        )
        return Result(
            result.n, result.statistic, result.p_value, result.effect_size, result.ci_low,
            result.ci_high, result.status, join_notes(note, result.reason, text),
            result.below_min_n,
        )  # fmt: skip

    return run
