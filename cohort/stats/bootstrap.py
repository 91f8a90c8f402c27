"""Seeded percentile bootstrap: resample draws in blocks, counts and intervals.

Confidence intervals (``ci_low``, ``ci_high``) are seeded percentile bootstrap
intervals at the run's ``ci_level``, resampling subjects (within each cohort
for between-cohort tests: stratified). Resamples where a statistic is
undefined are left out of the percentiles.

Memory: a test draws its ``B`` resamples of ``n`` subjects as
``rng.integers(0, n, size=(B, n))`` (one group after the other for
between-cohort tests), but never holds that B x n matrix: :func:`blocks`
hands out a few resamples at a time, about :data:`BLOCK_VALUES` indices per
block (at least one resample), and numpy's bounded integers consume the
generator value by value, so the blocks hold exactly the values of the one
big call (tests/test_stats_scale.py checks this). A test's working memory is
therefore a few blocks, linear in n, whatever ``B`` is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Final

import numpy as np

from cohort.stats.common import FloatArray, IntArray

__all__ = [
    "BLOCK_VALUES",
    "block_rows",
    "blocks",
    "counts_in_rows",
    "group_streams",
    "percentile_ci",
    "resample_counts",
]

# Indices per block of resamples: 2^18 int64 values = 2 MiB per array of a block.
BLOCK_VALUES: Final = 1 << 18


def percentile_ci(values: FloatArray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def block_rows(width: int, total: int) -> int:
    """Resamples per block when one resample holds ``width`` values (>= 1, <= ``total``)."""
    return max(1, min(total, BLOCK_VALUES // max(width, 1)))


def blocks(total: int, width: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of the blocks of ``total`` resamples of ``width`` values each."""
    step = block_rows(width, total)
    for start in range(0, total, step):
        yield start, min(start + step, total)


def counts_in_rows(index: IntArray, n: int) -> IntArray:
    """How often each of ``n`` items occurs in each row of ``index`` (rows x n, int64)."""
    rows = index.shape[0]
    flat = (index + n * np.arange(rows, dtype=np.int64)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.int64, copy=False)


def resample_counts(rng: np.random.Generator, n: int, draws: int) -> IntArray:
    """How often each of ``n`` items is drawn in each of ``draws`` bootstrap resamples.

    The whole draws x n matrix of the documented one-call draw: for small
    inputs and as the reference that the blocked statistics reproduce.
    """
    return counts_in_rows(rng.integers(0, n, size=(draws, n)), n)


def group_streams(
    rng: np.random.Generator, sizes: Sequence[int], draws: int
) -> list[np.random.Generator]:
    """One generator per group, each placed where that group's draws begin.

    The groups' resamples are documented as drawn one group after the other
    from ``rng``: ``rng.integers(0, n_1, size=(draws, n_1))``, then the same for
    group 2, and so on. To work through resample b of every group at once
    without holding any group's draws x n_g matrix, generator g is a copy of
    ``rng`` advanced past the draws of groups 1..g-1 (they are drawn block by
    block and dropped: bounded integers may reject and redraw, so the stream
    cannot be skipped arithmetically). The last group draws from ``rng``
    itself, which ends where the one-call-per-group code left it.
    """
    streams: list[np.random.Generator] = []
    for g, n in enumerate(sizes):
        if g == len(sizes) - 1:
            streams.append(rng)
            break
        streams.append(copy.deepcopy(rng))
        for start, stop in blocks(draws, n):
            rng.integers(0, n, size=(stop - start, n))
    return streams
