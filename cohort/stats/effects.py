"""Effect sizes of the rank tests, each with its formula and reference."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import stats as sps

from cohort.stats.common import FloatArray

__all__ = [
    "epsilon_squared",
    "kendalls_w",
    "rank_biserial_paired",
    "rank_biserial_rows",
    "rank_biserial_unpaired",
]


def rank_biserial_rows(d: FloatArray) -> FloatArray:
    """Matched-pairs rank-biserial correlation of each row of differences.

    Kerby (2014): r = (T+ - T-) / (T+ + T-), with T+ and T- the sums of the
    ranks of |d| over positive and negative differences. Zero differences are
    dropped first and the rest re-ranked (Wilcoxon's "wilcox" zero method, as
    in the test), so T+ + T- = m(m + 1)/2 for m non-zero differences. Zeros
    are the smallest |d|, so ranking all values and subtracting the number of
    zeros gives the ranks among the non-zero ones. NaN when every difference
    is zero.
    """
    absolute = np.abs(d)
    zeros = (absolute == 0).sum(axis=1)
    ranks = sps.rankdata(absolute, axis=1) - zeros[:, None]
    t_plus = np.where(d > 0, ranks, 0.0).sum(axis=1)
    t_minus = np.where(d < 0, ranks, 0.0).sum(axis=1)
    m = d.shape[1] - zeros
    total = m * (m + 1) / 2.0
    out = np.full(d.shape[0], np.nan)
    np.divide(t_plus - t_minus, total, out=out, where=total > 0)
    return out


def rank_biserial_paired(differences: npt.ArrayLike) -> float:
    """Matched-pairs rank-biserial correlation of paired differences x - y.

    +1: every non-zero difference is positive (x larger in every subject); -1:
    every one negative; 0: positive and negative ranks balance. Zero
    differences are dropped (see :func:`wilcoxon_pairs`).
    """
    d = np.asarray(differences, dtype=np.float64).reshape(1, -1)
    return float(rank_biserial_rows(d)[0])


def rank_biserial_unpaired(u1: float, n1: int, n2: int) -> float:
    """Rank-biserial correlation from Mann-Whitney U of the first group.

    r = 2 U1 / (n1 n2) - 1 = P(X > Y) - P(X < Y) for a random X of group 1 and
    Y of group 2 (Wendt 1972; Kerby 2014): +1 when every value of group 1
    exceeds every value of group 2.
    """
    return 2.0 * u1 / (n1 * n2) - 1.0


def kendalls_w(chi2: float, n: int, k: int) -> float:
    """Kendall's W from Friedman's chi-square: W = chi2 / (n (k - 1)).

    Agreement of the n subjects in how they rank the k conditions: 1 when all
    subjects rank the layers the same way, 0 when their rankings cancel.
    Uses scipy's tie-corrected chi-square, i.e. the tie-corrected W.
    """
    return chi2 / (n * (k - 1))


def epsilon_squared(h: float, n: int) -> float:
    """Epsilon-squared of Kruskal-Wallis: H / ((n^2 - 1) / (n + 1)) = H / (n - 1).

    Tomczak & Tomczak (2014): the share of rank variance explained by cohort,
    from 0 (no difference) to 1 (cohorts fully separated).
    """
    return h / (n - 1)
