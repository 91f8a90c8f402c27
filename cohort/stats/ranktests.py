"""The rank tests on cosines, each with its effect size and a bootstrap CI of it.

Each takes plain arrays and returns a :class:`~cohort.stats.common.Result`;
p-values come from scipy, and the bootstrap CIs are vectorised over resamples
(:mod:`cohort.stats.bootstrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from cohort.errors import StatsInputError
from cohort.stats.bootstrap import percentile_ci, resample_counts
from cohort.stats.common import (
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
    rank_biserial_rows,
    rank_biserial_unpaired,
)

__all__ = ["friedman_depth", "kruskal_wallis", "mann_whitney", "wilcoxon_pairs"]


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
        idx = rng.integers(0, n, size=(bootstrap, n))
        ci = percentile_ci(rank_biserial_rows(d[idx]), level)
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
        counts = resample_counts(rng, n, bootstrap).astype(np.float64)
        rank_sums = counts @ ranks
        correction = 1.0 - (counts @ ties) / (k * (k * k - 1) * n)
        chi2 = 12.0 / (k * n * (k + 1)) * (rank_sums**2).sum(axis=1) - 3.0 * n * (k + 1)
        w = np.full(bootstrap, np.nan)
        np.divide(chi2, correction * n * (k - 1), out=w, where=correction > 0)
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
        wins = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
        c1 = resample_counts(rng, n1, bootstrap).astype(np.float64)
        c2 = resample_counts(rng, n2, bootstrap).astype(np.float64)
        u = ((c1 @ wins) * c2).sum(axis=1)
        ci = percentile_ci(2.0 * u / (n1 * n2) - 1.0, level)
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
        parts = [g[rng.integers(0, g.size, size=(bootstrap, g.size))] for g in arrays]
        values = np.concatenate(parts, axis=1)
        ranks = sps.rankdata(values, axis=1)
        spans = sps.rankdata(values, axis=1, method="max") - sps.rankdata(
            values, axis=1, method="min"
        )
        correction = 1.0 - ((spans + 1.0) ** 2 - 1.0).sum(axis=1) / (total**3 - total)
        edges = np.cumsum([0, *sizes])
        between = sum(ranks[:, lo:hi].sum(axis=1) ** 2 / (hi - lo) for lo, hi in pairwise(edges))
        h_raw = 12.0 / (total * (total + 1)) * between - 3.0 * (total + 1)
        h = np.full(bootstrap, np.nan)
        np.divide(h_raw, correction, out=h, where=correction > 0)
        ci = percentile_ci(h / (total - 1), level)
    return finish(result, note, total, effect, ci, dropped)
