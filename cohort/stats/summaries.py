"""Per cohort x layer x region pair summaries, and the origin study's table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cohort.config import StatsConfig
from cohort.outputs.schemas import SIMILARITY_REQUIRED, SUMMARY_SCHEMA, pair_label, typed_frame
from cohort.stats.bootstrap import blocks, percentile_ci
from cohort.stats.common import rng_for
from cohort.stats.tables import pair_series, require_columns, unique_in_order

__all__ = ["origin_table", "summarise"]


def summarise(similarity: pd.DataFrame, cfg: StatsConfig) -> pd.DataFrame:
    """Per cohort x layer x region pair: n, n_nan, mean, sd, median and a bootstrap CI.

    Columns: cohort, layer, region_a, region_b, pair ("tibia-femur"), n (non-NaN
    cosines), n_nan (NaN cosines left out), mean, sd (ddof = 1), median, ci_low,
    ci_high. The CI is a seeded percentile bootstrap of the mean
    (``cfg.bootstrap`` resamples of subjects, level ``cfg.ci_level``; drawn
    ``rng.integers(0, n, size=(cfg.bootstrap, n))`` in blocks, see
    :mod:`cohort.stats.bootstrap`). sd is NaN
    when n < 2, the CI when n < 2 or ``cfg.bootstrap == 0``, all of them when
    n = 0. Cohorts sorted by name, layers and pairs in order of appearance.
    """
    require_columns(similarity, SIMILARITY_REQUIRED, "similarity")
    records: list[dict[str, object]] = []
    for key, values in pair_series(similarity).items():
        cohort, layer, (a, b) = key
        x = values.to_numpy(dtype=np.float64)
        n_nan = int(np.isnan(x).sum())
        x = x[~np.isnan(x)]
        n = int(x.size)
        nan = float("nan")
        mean = float(x.mean()) if n else nan
        sd = float(x.std(ddof=1)) if n >= 2 else nan
        median = float(np.median(x)) if n else nan
        low = high = nan
        if n >= 2 and cfg.bootstrap > 0:
            rng = rng_for(cfg.seed, f"summary|{cohort}|{layer}|{a}-{b}")
            means = np.empty(cfg.bootstrap)
            for start, stop in blocks(cfg.bootstrap, n):
                means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].sum(axis=1) / n
            low, high = percentile_ci(means, cfg.ci_level)
        records.append(
            {
                "cohort": cohort,
                "layer": layer,
                "region_a": a,
                "region_b": b,
                "pair": pair_label(a, b),
                "n": n,
                "n_nan": n_nan,
                "mean": mean,
                "sd": sd,
                "median": median,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return typed_frame(records, SUMMARY_SCHEMA)


def origin_table(similarity: pd.DataFrame) -> pd.DataFrame:
    """The origin study's table shape, per cohort: what ``similarity.csv`` holds.

    One row per cohort x region pair; columns ``cohort``, ``pair``
    ("tibia-femur") and one column per layer in order of appearance
    (``conv-1``, ``conv-3``, ...), holding the cohort mean of the non-NaN
    cosines (NaN where a cohort has none). Cohorts sorted by name, pairs in
    order of appearance.
    """
    require_columns(similarity, SIMILARITY_REQUIRED, "similarity")
    layers = unique_in_order(similarity["layer"]) if not similarity.empty else []
    means: dict[tuple[str, tuple[str, str]], dict[str, float]] = {}
    for (cohort, layer, pair), values in pair_series(similarity).items():
        x = values.to_numpy(dtype=np.float64)
        x = x[~np.isnan(x)]
        means.setdefault((cohort, pair), {})[layer] = float(x.mean()) if x.size else float("nan")
    records: list[dict[str, object]] = []
    for (cohort, (a, b)), by_layer in means.items():
        row: dict[str, object] = {"cohort": cohort, "pair": pair_label(a, b)}
        row.update({layer: by_layer.get(layer, float("nan")) for layer in layers})
        records.append(row)
    return _frame(records, ("cohort", "pair", *layers), ints=())


def _frame(
    records: list[dict[str, object]], columns: Sequence[str], ints: Sequence[str]
) -> pd.DataFrame:
    """A frame with fixed column order and dtypes (str -> object, ints, else float64)."""
    table = pd.DataFrame.from_records(records, columns=list(columns))
    for column in columns:
        if column in ints:
            table[column] = table[column].astype(np.int64)
        elif not records or isinstance(records[0][column], str):
            table[column] = table[column].astype(str)
        elif records:
            table[column] = table[column].astype(np.float64)
    return table.reset_index(drop=True)
