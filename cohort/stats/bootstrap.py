"""Seeded percentile bootstrap: resample counts and intervals.

Confidence intervals (``ci_low``, ``ci_high``) are seeded percentile bootstrap
intervals at the run's ``ci_level``, resampling subjects (within each cohort
for between-cohort tests: stratified). Resamples where a statistic is
undefined are left out of the percentiles.
"""

from __future__ import annotations

import numpy as np

from cohort.stats.common import FloatArray, IntArray

__all__ = ["percentile_ci", "resample_counts"]


def percentile_ci(values: FloatArray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def resample_counts(rng: np.random.Generator, n: int, draws: int) -> IntArray:
    """How often each of ``n`` items is drawn in each of ``draws`` bootstrap resamples."""
    idx = rng.integers(0, n, size=(draws, n))
    flat = (idx + n * np.arange(draws)[:, None]).ravel()
    return np.bincount(flat, minlength=draws * n).reshape(draws, n).astype(np.int64)
