"""The test families of a run: which tests, on which data, with which q-values.

:func:`run_tests` arranges the tables into the single tests of
:mod:`cohort.stats.ranktests` and :mod:`cohort.stats.permanova`, attaches the
sanity flags that touch each test's data and adds BH q-values per family and
over the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from typing import Any, Final

import numpy as np
import pandas as pd

from cohort.config import StatsConfig
from cohort.outputs.schemas import (
    FEATURES_COLUMNS,
    SIMILARITY_REQUIRED,
    TESTS_SCHEMA,
    pair_label,
    typed_frame,
)
from cohort.stats.adjusted.covariates import SubjectTable
from cohort.stats.adjusted.rows import (
    ADJUSTED_FAMILIES,
    AdjustedRow,
    adjusted_feature_rows,
    adjusted_pair_rows,
    stratified_permanova,
)
from cohort.stats.common import FloatArray, Result, TestRow, join_notes, rng_for, skipped
from cohort.stats.fdr import bh_qvalues
from cohort.stats.flags import FLAG_BELOW_MIN_N, Flag, collect_flags
from cohort.stats.permanova import permanova
from cohort.stats.ranktests import friedman_depth, kruskal_wallis, mann_whitney, wilcoxon_pairs
from cohort.stats.tables import (
    chosen_cosines,
    feature_spaces,
    pair_series,
    require_columns,
)

__all__ = ["FAMILIES", "run_tests"]

FAMILIES: Final = ("within-pairs", "within-depth", "between-pairs", "between-features")
# the unadjusted PERMANOVA within strata: (vectors, codes, ids, names, rng) -> Result
Strata = Callable[..., Result] | None


@dataclass(frozen=True)
class _Scope:
    """What data a test row touches, to attach sanity flags."""

    cohorts: frozenset[str]
    layers: frozenset[str]
    pairs: frozenset[tuple[str, str]]
    regions: frozenset[str]


def _scope(
    cohorts: Iterable[str], layers: Iterable[str], pairs: Iterable[tuple[str, str]]
) -> _Scope:
    """The scope of a test on region ``pairs``: it touches their regions too."""
    kept = frozenset(pairs)
    regions = frozenset(region for pair in kept for region in pair)
    return _Scope(frozenset(cohorts), frozenset(layers), kept, regions)


@dataclass(frozen=True)
class _Row(TestRow):
    scope: _Scope
    adjusted_for: str = ""


_TESTS: Final = {  # test -> (its family, the name of its effect size)
    "wilcoxon": ("within-pairs", "rank-biserial"),
    "friedman": ("within-depth", "kendall-w"),
    "mannwhitneyu": ("between-pairs", "rank-biserial"),
    "kruskal": ("between-pairs", "epsilon-squared"),
    "permanova": ("between-features", "r-squared"),
}


def _make_row(test: str, cohort: str, layer: str, pair: str, result: Result, scope: _Scope) -> _Row:
    family, effect_name = _TESTS[test]
    return _Row(family, cohort, layer, pair, test, effect_name, result, scope)


def _key(test: str, cohort: str, layer: str, pair: str) -> str:
    """The seed key of a test: stable across runs and independent of other tests."""
    return f"{_TESTS[test][0]}|{cohort}|{layer}|{pair}|{test}"


def _resampled(cfg: StatsConfig, test: str, cohort: str, layer: str, pair: str) -> dict[str, Any]:
    """What a bootstrapped test takes from ``cfg``: fewest subjects, resamples, level and
    a generator seeded for this test alone (:func:`_key`)."""
    rng = rng_for(cfg.seed, _key(test, cohort, layer, pair))
    return {"min_n": cfg.min_n, "bootstrap": cfg.bootstrap, "rng": rng, "level": cfg.ci_level}


def _flag_text(flags: Sequence[Flag], scope: _Scope, below_min_n: bool) -> str:
    names: set[str] = {FLAG_BELOW_MIN_N} if below_min_n else set()
    for flag in flags:
        if flag.cohort not in scope.cohorts or not scope.layers.intersection(flag.layers):
            continue
        if flag.pair is not None:
            if flag.pair in scope.pairs:
                names.add(flag.name)
        elif flag.region in scope.regions:
            names.add(flag.name)
    return ";".join(sorted(names))


class _Cosines:
    """The similarity table arranged for the tests (cohorts sorted, subjects sorted)."""

    def __init__(self, similarity: pd.DataFrame) -> None:
        self.series = pair_series(similarity)
        self.cohorts = sorted({k[0] for k in self.series})
        self.layers = list(dict.fromkeys(k[1] for k in self.series))
        self.pairs = list(dict.fromkeys(k[2] for k in self.series))

    def get(self, cohort: str, layer: str, pair: tuple[str, str]) -> pd.Series:
        return self.series.get((cohort, layer, pair), pd.Series(dtype=np.float64))

    def values(self, cohort: str, layer: str, pair: tuple[str, str]) -> FloatArray:
        return self.get(cohort, layer, pair).to_numpy(dtype=np.float64)


def _aligned(columns: list[pd.Series]) -> FloatArray:
    """Series of one subject's cosines side by side: a row per subject, in subject order."""
    table = pd.concat(columns, axis=1).sort_index() if columns else pd.DataFrame()
    return table.to_numpy(dtype=np.float64).reshape(len(table), len(columns))


def _within_pairs(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for cohort in cos.cohorts:
        for layer in cos.layers:
            for p1, p2 in combinations(cos.pairs, 2):
                both = _aligned([cos.get(cohort, layer, p1), cos.get(cohort, layer, p2)])
                label = f"{pair_label(*p1)}|{pair_label(*p2)}"
                settings = _resampled(cfg, "wilcoxon", cohort, layer, label)
                result = wilcoxon_pairs(both[:, 0], both[:, 1], **settings)
                scope = _scope([cohort], [layer], [p1, p2])
                rows.append(_make_row("wilcoxon", cohort, layer, label, result, scope))
    return rows


def _within_depth(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for cohort in cos.cohorts:
        for pair in cos.pairs:
            present = [layer for layer in cos.layers if (cohort, layer, pair) in cos.series]
            joined, label = "|".join(present), pair_label(*pair)
            result = friedman_depth(
                _aligned([cos.get(cohort, layer, pair) for layer in present]),
                **_resampled(cfg, "friedman", cohort, joined, label),
            )
            scope = _scope([cohort], present, [pair])
            rows.append(_make_row("friedman", cohort, joined, label, result, scope))
    return rows


def _between_pairs(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for layer, pair in product(cos.layers, cos.pairs):
        label = pair_label(*pair)

        def scope(
            cohorts: Sequence[str], layer: str = layer, pair: tuple[str, str] = pair
        ) -> _Scope:
            return _scope(cohorts, [layer], [pair])

        if len(cos.cohorts) < 2:
            for cohort in cos.cohorts:
                n = int(np.count_nonzero(~np.isnan(cos.values(cohort, layer, pair))))
                result = skipped(n, "one cohort")
                rows.append(
                    _make_row("mannwhitneyu", cohort, layer, label, result, scope([cohort]))
                )
            continue
        for c1, c2 in combinations(cos.cohorts, 2):
            joined = f"{c1}|{c2}"
            result = mann_whitney(
                cos.values(c1, layer, pair),
                cos.values(c2, layer, pair),
                names=(c1, c2),
                **_resampled(cfg, "mannwhitneyu", joined, layer, label),
            )
            rows.append(_make_row("mannwhitneyu", joined, layer, label, result, scope([c1, c2])))
        if len(cos.cohorts) >= 3:
            joined = "|".join(cos.cohorts)
            result = kruskal_wallis(
                [cos.values(c, layer, pair) for c in cos.cohorts],
                names=cos.cohorts,
                **_resampled(cfg, "kruskal", joined, layer, label),
            )
            rows.append(_make_row("kruskal", joined, layer, label, result, scope(cos.cohorts)))
    return rows


def _between_features(features: pd.DataFrame, cfg: StatsConfig, strata: Strata) -> list[_Row]:
    rows: list[_Row] = []
    for space in feature_spaces(features, cfg.centre):
        layer, region, ids, cohorts, vectors = (
            space.layer,
            space.region,
            space.ids,
            space.cohorts,
            space.vectors,
        )
        present = sorted(set(cohorts.tolist()))

        def scope(group: Sequence[str], layer: str = layer, region: str = region) -> _Scope:
            return _Scope(frozenset(group), frozenset({layer}), frozenset(), frozenset({region}))

        if len(present) < 2:
            for cohort in present:
                result = skipped(int(ids.size), "one cohort")
                rows.append(_make_row("permanova", cohort, layer, region, result, scope([cohort])))
            continue
        groups: list[tuple[str, ...]] = list(combinations(present, 2))
        if len(present) >= 3:
            groups.append(tuple(present))
        for group in groups:
            joined = "|".join(group)
            keep = np.isin(cohorts, group)
            codes = pd.Index(group).get_indexer(pd.Index(cohorts[keep])).astype(np.int64)
            rng = rng_for(cfg.seed, _key("permanova", joined, layer, region))
            if strata is None:
                result = permanova(
                    vectors[keep],
                    codes,
                    min_n=cfg.min_n,
                    permutations=cfg.permutations,
                    rng=rng,
                    names=group,
                )
            else:
                result = strata(vectors[keep], codes, ids[keep], group, rng)
            rows.append(_make_row("permanova", joined, layer, region, result, scope(group)))
    return rows


def _from_adjusted(row: AdjustedRow) -> _Row:
    scope = _Scope(
        frozenset(row.cohorts), frozenset(row.layers), frozenset(row.pairs), frozenset(row.regions)
    )
    return _Row(
        row.family, row.cohort, row.layer, row.pair, row.test, row.effect_name, row.result,
        scope, row.adjusted_for,
    )  # fmt: skip


def run_tests(
    features: pd.DataFrame,
    similarity: pd.DataFrame,
    cfg: StatsConfig,
    table: SubjectTable | None = None,
    *,
    note: str = "",
) -> pd.DataFrame:
    """Every within- and between-cohort test, one row each, with BH q-values.

    The cosine tests use ``similarity``'s ``cosine`` column, or its
    ``cosine_centred`` column when ``cfg.centre``.

    Families (``family`` column), tests (``test``) and effect sizes (``effect_name``):

    - ``within-pairs``: per cohort x layer x two region pairs (``pair`` =
      "tibia-femur|tibia-background"), paired over subjects: ``wilcoxon``,
      ``rank-biserial`` (positive: the first pair is more similar). See
      :func:`wilcoxon_pairs`.
    - ``within-depth``: per cohort x region pair, across all layers
      (``layer`` = "conv-1|conv-3|conv-5"): ``friedman``, ``kendall-w``. See
      :func:`friedman_depth`.
    - ``between-pairs``: per layer x region pair, cosines of independent
      cohorts: ``mannwhitneyu`` for every two cohorts (``cohort`` = "a|b",
      ``rank-biserial``, positive: a higher) and ``kruskal`` over all cohorts
      when there are >= 3 (``epsilon-squared``). See :func:`mann_whitney`,
      :func:`kruskal_wallis`.
    - ``between-features``: per layer x region (``pair`` = the region), the
      subjects' vectors (centred first when ``cfg.centre``, with the pooled
      mean, which permuting labels leaves unchanged): ``permanova`` for every
      two cohorts and for all cohorts when >= 3, ``r-squared``. See
      :func:`permanova`.

    Columns, in order: family, cohort, layer, pair, test, n, statistic,
    p_value, q_value (BH within the family), q_value_run (BH over every test
    that ran), effect_size, effect_name, ci_low, ci_high (bootstrap CI of the
    effect size; NaN for permanova), status ("ok" / "skipped"), reason (why
    skipped, or what was dropped), flag (";"-joined sanity flags touching the
    test's data, plus ``below-min-n`` on rows skipped for it; "" when none).
    With one cohort the between families get one skipped row per layer x pair
    (or region) with reason "one cohort". Rows run family by family in the
    order above, then as the loops go (cohorts sorted, layers and pairs in
    order of appearance); the frame is byte-identical for the same inputs and
    cfg.

    ``table`` (the subjects' covariates, strata and batch,
    :func:`~cohort.stats.adjusted.covariates.subject_table`) adds, when it has
    covariates, the families ``between-pairs-adjusted`` and
    ``between-features-adjusted`` after the others (:mod:`cohort.stats.adjusted.rows`;
    ``adjusted_for`` names the covariates, ``""`` on every other row); with strata,
    the PERMANOVA permutations stay within them. ``note`` (e.g. that the vectors
    were harmonised) joins every row's reason. Without ``table`` the rows are
    exactly the unadjusted ones, with ``adjusted_for`` empty.
    """
    require_columns(features, FEATURES_COLUMNS, "features")
    require_columns(similarity, SIMILARITY_REQUIRED, "similarity")
    flags = collect_flags(features, similarity)
    cos = _Cosines(chosen_cosines(similarity, cfg.centre))
    strata = stratified_permanova(table, cfg) if table is not None and table.strata else None
    rows = [
        *_within_pairs(cos, cfg),
        *_within_depth(cos, cfg),
        *_between_pairs(cos, cfg),
        *_between_features(features, cfg, strata),
    ]
    if table is not None and table.covariates:
        adjusted = adjusted_pair_rows(cos.series, cos.cohorts, cos.layers, cos.pairs, table, cfg)
        adjusted += adjusted_feature_rows(list(feature_spaces(features, cfg.centre)), table, cfg)
        rows += [_from_adjusted(row) for row in adjusted]
    return _assemble(rows, flags, note)


def _assemble(rows: list[_Row], flags: list[Flag], note: str = "") -> pd.DataFrame:
    """Rows to the fixed-column frame, with q-values per family and over the run."""
    # a test's flag text depends on a flag's name, cohort, layers, pair and region
    # only: one of each is enough (there may be one per subject)
    flags = list({(f.name, f.cohort, f.layers, f.pair, f.region): f for f in flags}.values())
    table = pd.DataFrame(
        {
            "family": [r.family for r in rows],
            "cohort": [r.cohort for r in rows],
            "layer": [r.layer for r in rows],
            "pair": [r.pair for r in rows],
            "test": [r.test for r in rows],
            "adjusted_for": [r.adjusted_for for r in rows],
            "n": np.array([r.result.n for r in rows], dtype=np.int64),
            "statistic": [r.result.statistic for r in rows],
            "p_value": [r.result.p_value for r in rows],
            "effect_size": [r.result.effect_size for r in rows],
            "effect_name": [r.effect_name for r in rows],
            "ci_low": [r.result.ci_low for r in rows],
            "ci_high": [r.result.ci_high for r in rows],
            "status": [r.result.status for r in rows],
            "reason": [join_notes(r.result.reason, note) for r in rows],
            "flag": [_flag_text(flags, r.scope, r.result.below_min_n) for r in rows],
        }
    )
    p = table["p_value"].to_numpy(dtype=np.float64)
    ok = (table["status"] == "ok").to_numpy(dtype=bool)
    family = table["family"].to_numpy(dtype=object)
    q_family = np.full(p.shape, np.nan)
    for name in (*FAMILIES, *ADJUSTED_FAMILIES):
        members = ok & (family == name)
        q_family[members] = bh_qvalues(p[members])
    q_run = np.full(p.shape, np.nan)
    q_run[ok] = bh_qvalues(p[ok])
    table["q_value"] = q_family
    table["q_value_run"] = q_run
    return typed_frame(table.to_dict("records"), TESTS_SCHEMA)
