"""The rank tests on cosines, each with its effect size and a bootstrap CI of it.

Each takes plain arrays and returns a :class:`~cohort.stats.common.Result`;
p-values come from scipy, and the bootstrap CIs are vectorised over blocks of
resamples (:mod:`cohort.stats.bootstrap`).

A resample is a multiset of the subjects, so the ranks in it follow from how
often each value is drawn: sort the values once; with ``cum`` the running
count of drawn values in sorted order, a value whose run of ties occupies
sorted positions [lo, hi) has the average rank ``cum[lo] + (cum[hi] - cum[lo]
+ 1) / 2`` in the resample. The bootstrap statistics below are computed that
way, in O(n) per resample and with no pairwise matrix; ranks are kept doubled
in integers, so rank sums are exact and every CI equals the one of ranking
each resample with scipy (tests/test_stats_bootstrap.py replays them).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from cohort.errors import StatsInputError
from cohort.stats.bootstrap import blocks, counts_in_rows, group_streams, percentile_ci
from cohort.stats.common import (
    FloatArray,
    IntArray,
    Result,
    call_scipy,
    dropped_note,
    finish,
    join_notes,
    skipped,
    small_groups_note,
)
from cohort.stats.effects import (
    epsilon_squared,
    kendalls_w,
    rank_biserial_paired,
    rank_biserial_unpaired,
)

__all__ = ["friedman_depth", "kruskal_wallis", "mann_whitney", "wilcoxon_pairs"]


def _sorted_positions(values: FloatArray) -> tuple[FloatArray, IntArray]:
    """``values`` sorted ascending, and the sorted position of each original value."""
    order = np.argsort(values, kind="stable")
    position = np.empty(values.size, dtype=np.int64)
    position[order] = np.arange(values.size, dtype=np.int64)
    return values[order], position


def _running(counts: IntArray) -> IntArray:
    """Running sums of each row with a leading 0: ``cum[:, p]`` = count before position p."""
    cum = np.zeros((counts.shape[0], counts.shape[1] + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=cum[:, 1:])
    return cum


def _wilcoxon_bootstrap(d: FloatArray, rng: np.random.Generator, bootstrap: int) -> FloatArray:
    """Matched-pairs rank-biserial r of each resample of the differences ``d``.

    The resamples are ``rng.integers(0, n, size=(bootstrap, n))`` (drawn in
    blocks); r equals :func:`~cohort.stats.effects.rank_biserial_rows` of
    ``d[index]``: zeros are left out and the rest re-ranked by |d|.
    """
    n = d.size
    magnitude, position = _sorted_positions(np.abs(d))
    lo = np.searchsorted(magnitude, magnitude, "left")
    hi = np.searchsorted(magnitude, magnitude, "right")
    zero_end = int(np.searchsorted(magnitude, 0.0, "right"))  # zeros sort first
    sign = np.zeros(n, dtype=np.int64)
    sign[position] = np.sign(d).astype(np.int64)
    tied = bool((magnitude[1:] == magnitude[:-1]).any())
    out = np.full(bootstrap, np.nan)
    for start, stop in blocks(bootstrap, n):
        counts = counts_in_rows(position[rng.integers(0, n, size=(stop - start, n))], n)
        cum = _running(counts)
        zeros = cum[:, zero_end]
        # doubled rank among the non-zero |d| = cum[lo] + cum[hi] + 1 - 2 zeros; without
        # ties, lo = p and hi = p + 1, so cum[lo] + cum[hi] = 2 cum[p] + counts[p]
        ends = cum[:, lo] + cum[:, hi] if tied else 2 * cum[:, :-1] + counts
        weights = counts * sign
        signed = np.einsum("ij,ij->i", weights, ends) + (1 - 2 * zeros) * weights.sum(axis=1)
        m = n - zeros
        total = m * (m + 1) / 2.0
        np.divide(signed / 2.0, total, out=out[start:stop], where=total > 0)
    return out


def _mann_whitney_bootstrap(
    a: FloatArray, b: FloatArray, rng: np.random.Generator, bootstrap: int
) -> FloatArray:
    """Rank-biserial r = 2 U / (n1 n2) - 1 of each stratified resample.

    Resamples: ``rng.integers(0, n1, size=(bootstrap, n1))`` for the first
    group, then the same for the second (:func:`group_streams`). U of a
    resample is the sum over its x values of the number of its y values below
    x plus half those equal, read off the running counts of the drawn y
    values in sorted order.
    """
    n1, n2 = a.size, b.size
    sorted_b, position = _sorted_positions(b)
    below = np.searchsorted(sorted_b, a, "left")
    up_to = np.searchsorted(sorted_b, a, "right")
    tied = bool((below != up_to).any())  # some x equals some y
    first, second = group_streams(rng, (n1, n2), bootstrap)
    out = np.empty(bootstrap)
    for start, stop in blocks(bootstrap, n1 + n2):
        rows = stop - start
        cx = counts_in_rows(first.integers(0, n1, size=(rows, n1)), n1)
        cum = _running(counts_in_rows(position[second.integers(0, n2, size=(rows, n2))], n2))
        # 2 U = sum over drawn x of (#y below x) + (#y up to x): exact integers
        low = np.einsum("ij,ij->i", cx, cum[:, below])
        twice_u = low + (np.einsum("ij,ij->i", cx, cum[:, up_to]) if tied else low)
        u = twice_u / 2.0
        out[start:stop] = 2.0 * u / (n1 * n2) - 1.0
    return out


def _kruskal_bootstrap(
    arrays: Sequence[FloatArray], rng: np.random.Generator, bootstrap: int
) -> FloatArray:
    """Epsilon-squared H / (N - 1) of each stratified resample (NaN when H is undefined).

    Resamples: ``rng.integers(0, n_g, size=(bootstrap, n_g))`` group after
    group (:func:`group_streams`). Rank sums and the tie term sum over tie
    runs t^3 - t come from the running counts of the pooled resample in
    sorted order; the arithmetic after them is scipy's (and the old
    whole-matrix code's), expression by expression.
    """
    sizes = [int(g.size) for g in arrays]
    total = sum(sizes)
    values, position = _sorted_positions(np.concatenate(arrays))
    lo = np.searchsorted(values, values, "left")
    hi = np.searchsorted(values, values, "right")
    tied = bool((values[1:] == values[:-1]).any())
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    ends = np.r_[starts[1:], total]
    edges = np.cumsum([0, *sizes])
    positions = [position[start:stop] for start, stop in pairwise(edges)]
    # a sorted position holds one subject of one group: a group's rank sum is the sum
    # over its positions of (times drawn) x (rank)
    members = [np.sort(where) for where in positions]
    streams = group_streams(rng, sizes, bootstrap)
    out = np.full(bootstrap, np.nan)
    for start, stop in blocks(bootstrap, total):
        rows = stop - start
        drawn = [
            where[stream.integers(0, size, size=(rows, size))]
            for where, stream, size in zip(positions, streams, sizes, strict=True)
        ]
        counts = counts_in_rows(np.concatenate(drawn, axis=1), total)
        del drawn
        cum = _running(counts)
        if tied:
            twice_rank = cum[:, lo] + cum[:, hi] + 1
            runs = cum[:, ends] - cum[:, starts]
        else:  # lo = p, hi = p + 1, and every run is one position
            twice_rank = 2 * cum[:, :-1] + counts + 1
            runs = counts
        ties = (runs**3 - runs).sum(axis=1).astype(np.float64)
        correction = 1.0 - ties / (total**3 - total)
        weighted = counts * twice_rank
        rank_sums = [weighted[:, group].sum(axis=1) / 2.0 for group in members]
        between = sum(
            r**2 / (hi_ - lo_) for r, (lo_, hi_) in zip(rank_sums, pairwise(edges), strict=True)
        )
        h_raw = 12.0 / (total * (total + 1)) * between - 3.0 * (total + 1)
        np.divide(h_raw, correction, out=out[start:stop], where=correction > 0)
    return out / (total - 1)


def wilcoxon_pairs(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> Result:
    """Wilcoxon signed-rank test of paired values x, y (subject = unit), two-sided.

    Asks whether, within subjects, one region pair's cosine tends to exceed
    the other's. scipy.stats.wilcoxon with zero_method="wilcox" (scipy's
    default): subjects whose two cosines are equal carry no sign and are
    dropped before ranking, and the effect size drops them the same way; the
    count is in ``reason``. Subjects with a NaN in either value are dropped.
    Skipped when fewer than ``min_n`` subjects remain or every difference is 0.

    Effect: matched-pairs rank-biserial correlation of x - y (positive: x
    larger). CI: percentile bootstrap over subjects of that correlation.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    dropped = dropped_note(int((~keep).sum()), "a NaN cosine")
    d = a[keep] - b[keep]
    n = int(d.size)
    if n < min_n:
        return skipped(n, join_notes(dropped, f"n={n} below min_n={min_n}"), below_min_n=True)
    if not (d != 0).any():
        return skipped(n, join_notes(dropped, "all differences are zero"))
    zeros = int((d == 0).sum())
    if zeros:
        dropped = join_notes(dropped, f"{zeros} zero difference(s) left out of the ranks")
    effect = rank_biserial_paired(d)
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        ci = percentile_ci(_wilcoxon_bootstrap(d, rng, bootstrap), level)
    result, note = call_scipy(
        lambda: sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    )
    return finish(result, note, n, effect, ci, dropped)


def friedman_depth(
    data: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> Result:
    """Friedman test across k >= 3 layers of one region pair (rows = subjects).

    Asks whether a pair's cosine changes with depth, using each subject's
    ranking of the layers. scipy.stats.friedmanchisquare. Subjects with a NaN
    at any layer are dropped. Skipped with fewer than 3 layers, fewer than
    ``min_n`` subjects, or when every subject ties all layers.

    Effect: Kendall's W (see :func:`kendalls_w`). CI: percentile bootstrap
    over subjects of W (rank sums and tie terms of resampled subjects).
    """
    matrix = np.asarray(data, dtype=np.float64)
    if matrix.ndim != 2:
        raise StatsInputError(f"Friedman data must be subjects x layers, got shape {matrix.shape}")
    k = matrix.shape[1]
    keep = ~np.isnan(matrix).any(axis=1)
    dropped = dropped_note(int((~keep).sum()), "a NaN cosine at some layer")
    matrix = matrix[keep]
    n = int(matrix.shape[0])
    if k < 3:
        return skipped(n, join_notes(dropped, f"Friedman needs >= 3 layers, found {k}"))
    if n < min_n:
        return skipped(n, join_notes(dropped, f"n={n} below min_n={min_n}"), below_min_n=True)
    ranks = sps.rankdata(matrix, axis=1)
    spans = sps.rankdata(matrix, axis=1, method="max") - sps.rankdata(matrix, axis=1, method="min")
    # sum over tie groups of t(t^2 - 1) = sum over values of (t^2 - 1), t = span + 1
    ties = ((spans + 1.0) ** 2 - 1.0).sum(axis=1)
    if np.all(ties == k * (k * k - 1)):
        return skipped(n, join_notes(dropped, "every subject has equal values at all layers"))
    result, note = call_scipy(lambda: sps.friedmanchisquare(*matrix.T))
    effect = float("nan")
    if result is not None:
        effect = kendalls_w(float(getattr(result, "statistic")), n, k)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        w = np.full(bootstrap, np.nan)
        by_layer = np.ascontiguousarray(ranks.T)
        for start, stop in blocks(bootstrap, n):
            draws = rng.integers(0, n, size=(stop - start, n))
            # sums of halves and integers: exact in any order, as the old counts @ ranks
            rank_sums = np.stack([layer[draws].sum(axis=1) for layer in by_layer], axis=1)
            correction = 1.0 - ties[draws].sum(axis=1) / (k * (k * k - 1) * n)
            chi2 = 12.0 / (k * n * (k + 1)) * (rank_sums**2).sum(axis=1) - 3.0 * n * (k + 1)
            np.divide(chi2, correction * n * (k - 1), out=w[start:stop], where=correction > 0)
        ci = percentile_ci(w, level)
    return finish(result, note, n, effect, ci, dropped)


def mann_whitney(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    names: tuple[str, str] = ("x", "y"),
    level: float = 0.95,
) -> Result:
    """Mann-Whitney U test, two-sided, of two independent groups (scipy defaults).

    Asks whether values of one cohort tend to exceed the other's. NaN values
    are dropped. Skipped when a group has fewer than ``min_n`` values or all
    values are equal. ``statistic`` is U of the first group.

    Effect: rank-biserial correlation (see :func:`rank_biserial_unpaired`).
    CI: percentile bootstrap of r, resampling subjects within each group.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    dropped = dropped_note(int(np.isnan(a).sum() + np.isnan(b).sum()), "a NaN cosine")
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n1, n2 = int(a.size), int(b.size)
    small = small_groups_note((n1, n2), names, min_n)
    if small:
        return skipped(n1 + n2, join_notes(dropped, small), below_min_n=True)
    if np.all(np.concatenate([a, b]) == a[0]):
        return skipped(n1 + n2, join_notes(dropped, "all values are equal"))
    result, note = call_scipy(lambda: sps.mannwhitneyu(a, b, alternative="two-sided"))
    effect = float("nan")
    if result is not None:
        effect = rank_biserial_unpaired(float(getattr(result, "statistic")), n1, n2)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        ci = percentile_ci(_mann_whitney_bootstrap(a, b, rng, bootstrap), level)
    return finish(result, note, n1 + n2, effect, ci, dropped)


def kruskal_wallis(
    groups: Sequence[npt.ArrayLike],
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
    level: float = 0.95,
) -> Result:
    """Kruskal-Wallis H test over three or more independent groups (scipy).

    Asks whether any cohort tends to differ from the others. NaN values are
    dropped. Skipped when a group has fewer than ``min_n`` values or all
    values are equal.

    Effect: epsilon-squared (see :func:`epsilon_squared`). CI: percentile
    bootstrap of epsilon-squared, resampling subjects within each group.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    labels = list(names) if names is not None else [f"group {i + 1}" for i in range(len(arrays))]
    dropped = dropped_note(sum(int(np.isnan(g).sum()) for g in arrays), "a NaN cosine")
    arrays = [g[~np.isnan(g)] for g in arrays]
    sizes = [int(g.size) for g in arrays]
    total = sum(sizes)
    small = small_groups_note(sizes, labels, min_n)
    if small:
        return skipped(total, join_notes(dropped, small), below_min_n=True)
    pooled = np.concatenate(arrays)
    if np.all(pooled == pooled[0]):
        return skipped(total, join_notes(dropped, "all values are equal"))
    result, note = call_scipy(lambda: sps.kruskal(*arrays))
    effect = float("nan")
    if result is not None:
        effect = epsilon_squared(float(getattr(result, "statistic")), total)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        ci = percentile_ci(_kruskal_bootstrap(arrays, rng, bootstrap), level)
    return finish(result, note, total, effect, ci, dropped)
