"""Freedman-Lane tests of cosines: ``cosine ~ cohort + covariates``, and the CI of the effect.

The statistic is the F of the cohort term given the covariates (type II, the
model with the covariates only against the full model) and the p-value comes
from permuting the reduced model's residuals (:mod:`.model`). The effect size
is the partial eta squared of the cohort term,

    eta_p^2 = SS_cohort / (SS_cohort + RSS_full) = 1 - RSS_full / RSS_reduced,

the share of the variation left by the covariates that cohort explains (Cohen
1973). Its CI is a seeded percentile bootstrap over subjects, resampled within
each cohort as the Mann-Whitney CI is: group g's resamples are
``rng.integers(0, n_g, size=(bootstrap, n_g))``, group after group, drawn in
blocks (:mod:`cohort.stats.bootstrap`). A resample is the model refitted with
weights = how often each subject was drawn, from the weighted normal equations
in an orthonormal basis of the full design; a resample whose design is
singular (a level of a categorical covariate not drawn) is left out of the
percentiles.

References
----------
Freedman, D., & Lane, D. (1983). A nonstochastic interpretation of reported
significance levels. Journal of Business & Economic Statistics, 1(4), 292-298.

Cohen, J. (1973). Eta-squared and partial eta-squared in fixed factor ANOVA
designs. Educational and Psychological Measurement, 33(1), 107-112.

Winkler, A. M., Ridgway, G. R., Webster, M. A., Smith, S. M., & Nichols, T. E.
(2014). Permutation inference for the general linear model. NeuroImage, 92,
381-397.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from cohort.stats.adjusted.model import Design, Marginal, marginal_test
from cohort.stats.bootstrap import blocks, counts_in_rows, group_streams, percentile_ci
from cohort.stats.common import FloatArray, IntArray

__all__ = ["freedman_lane", "partial_eta_squared_bootstrap"]

# A resample's weighted design counts as singular above this condition number.
_SINGULAR: Final = 1e12


def partial_eta_squared_bootstrap(
    design: Design,
    responses: FloatArray,
    cohorts: IntArray,
    rng: np.random.Generator,
    bootstrap: int,
) -> FloatArray:
    """Partial eta squared of each column of ``responses`` in each resample (B x m).

    Resamples are stratified by ``cohorts`` (codes 0 .. g-1, subjects in any order).
    """
    n, m = responses.shape
    basis, _ = np.linalg.qr(np.column_stack([design.z, design.x]))  # first q columns span Z
    p, q = basis.shape[1], design.z.shape[1]
    outer = (basis[:, :, None] * basis[:, None, :]).reshape(n, p * p)
    cross = (basis[:, :, None] * responses[:, None, :]).reshape(n, p * m)
    weighted = np.hstack([outer, cross, responses * responses])
    members = [np.flatnonzero(cohorts == k) for k in range(int(cohorts.max()) + 1)]
    sizes = [int(g.size) for g in members]
    streams = group_streams(rng, sizes, bootstrap)
    out = np.full((bootstrap, m), np.nan)
    for start, stop in blocks(bootstrap, n):
        rows = stop - start
        drawn = [
            where[stream.integers(0, size, size=(rows, size))]
            for where, stream, size in zip(members, streams, sizes, strict=True)
        ]
        counts = counts_in_rows(np.concatenate(drawn, axis=1), n).astype(np.float64)
        sums = counts @ weighted
        gram = sums[:, : p * p].reshape(rows, p, p)
        xy = sums[:, p * p : p * p + p * m].reshape(rows, p, m)
        yy = sums[:, p * p + p * m :]
        singular = ~(np.linalg.cond(gram) < _SINGULAR)
        gram[singular] = np.eye(p)
        full = (xy * np.linalg.solve(gram, xy)).sum(axis=1)
        reduced_gram = gram[:, :q, :q]
        reduced = (xy[:, :q] * np.linalg.solve(reduced_gram, xy[:, :q])).sum(axis=1)
        rss_full, rss_reduced = yy - full, yy - reduced
        eta = np.full((rows, m), np.nan)
        np.divide(rss_full, rss_reduced, out=eta, where=rss_reduced > 0)
        eta = np.clip(1.0 - eta, 0.0, 1.0)
        eta[singular] = np.nan
        out[start:stop] = eta
    return out


def freedman_lane(
    design: Design,
    responses: FloatArray,
    cohorts: IntArray,
    *,
    permutations: int,
    bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
    strata: npt.NDArray[np.integer] | None = None,
) -> tuple[Marginal, FloatArray, list[tuple[float, float]]]:
    """Freedman-Lane test of the cohort term for each column of ``responses`` (n x m).

    Parameters
    ----------
    design : Design
        :func:`~cohort.stats.adjusted.model.build_design` of these subjects (not refused).
    responses : ndarray
        One column per test (cosines of one layer and region pair), n subjects.
    cohorts : ndarray of int
        Each subject's cohort code.
    permutations, bootstrap : int
        Permutations of the reduced model's residuals; bootstrap resamples of the CI.
    rng : numpy.random.Generator
        Shared by the columns: one set of permutations (drawn first), then the
        resamples.
    level : float
        Coverage of the percentile CI.
    strata : ndarray of int, optional
        Permutations stay within these strata.

    Returns
    -------
    marginal : Marginal
        F (type II), sums of squares and permutation counts per column.
    eta : ndarray
        Partial eta squared per column.
    ci : list of (float, float)
        Percentile CI per column; NaN when ``bootstrap`` is 0 or no resample was usable.

    Examples
    --------
    The F equals statsmodels' type-II ANOVA of ``y ~ age + C(cohort)`` (see
    tests/test_adjusted.py).
    """
    groups = np.arange(responses.shape[1], dtype=np.int64)
    marginal = marginal_test(
        design, responses, groups, permutations=permutations, rng=rng, strata=strata
    )
    eta = np.full(marginal.ss_term.shape, np.nan)
    denominator = marginal.ss_term + marginal.rss
    np.divide(marginal.ss_term, denominator, out=eta, where=denominator > 0)
    nan = float("nan")
    ci = [(nan, nan)] * responses.shape[1]
    if bootstrap > 0:
        values = partial_eta_squared_bootstrap(design, responses, cohorts, rng, bootstrap)
        ci = [percentile_ci(values[:, j], level) for j in range(responses.shape[1])]
    return marginal, eta, ci
