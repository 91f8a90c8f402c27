"""The linear model of an adjusted test: design, marginal F, Freedman-Lane permutations.

The model of a test is ``response ~ covariates + cohort`` with an intercept.
The cohort term is tested *by margin* (type II: the model with the covariates
only against the full model; with main effects only this is also type III):

- Z = [1, covariate columns] (n x q), X = cohort dummies (n x h, h = groups - 1);
- Q_Z an orthonormal basis of Z, W one of the part of X orthogonal to Z (X
  minus its projection on Z), both from QR decompositions;
- E = (I - Q_Z Q_Z') R, the residuals of the reduced model for each column of
  the response R (n x C);
- SS_term = |W' E|^2, RSS = |E|^2 - SS_term (the full model's residual sum of
  squares), F = (SS_term / h) / (RSS / (n - q - h)).

For C > 1 columns that form one response (a feature space), the squares are
summed over its columns: with R the unit vectors over sqrt(2), this is the
distance-based model of McArdle & Anderson (2001) on the Gower-centred matrix
of 1 - cos, as vegan's ``adonis2(..., by = "margin")`` computes it
(:mod:`cohort.stats.adjusted.margin`).

P-values: permutation of the reduced model's residuals (Freedman & Lane 1983;
vegan's ``permutest.cca(model = "reduced")``): the statistic of E[pi] for random
permutations pi (within strata when given), refitted against the full model.
Since E is orthogonal to the intercept, only the non-intercept columns of Q_Z
and W enter: per permutation the cost is O(n k C) for k = q - 1 + h, and memory
one block of permutations (:mod:`.permute`), never n x n.

References
----------
Freedman, D., & Lane, D. (1983). A nonstochastic interpretation of reported
significance levels. Journal of Business & Economic Statistics, 1(4), 292-298.

McArdle, B. H., & Anderson, M. J. (2001). Fitting multivariate models to
community data: a comment on distance-based redundancy analysis. Ecology,
82(1), 290-297.

Anderson, M. J. (2001). Permutation tests for univariate or multivariate
analysis of variance and regression. Canadian Journal of Fisheries and Aquatic
Sciences, 58(3), 626-639.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from cohort.stats.adjusted.covariates import SubjectTable, design_columns
from cohort.stats.adjusted.permute import permutation_blocks
from cohort.stats.common import FloatArray, IntArray

__all__ = ["Design", "Marginal", "build_design", "marginal_test"]

# Relative tolerance when counting permuted F >= the observed one (as permanova.py).
_PERM_TOL: Final = 1e-10
# RSS at or below this share of the residual total is rounding: taken as 0.
_RSS_ROUNDING: Final = 1e-10
# Singular values below this share of the largest mark a rank-deficient design.
_RANK_TOL: Final = 1e-10


@dataclass(frozen=True)
class Design:
    """The design of one test: Z (intercept first), the cohort dummies X, and notes.

    ``refusal`` is non-empty when the cohort term cannot be tested (the reason);
    ``note`` says which covariates were left out as constant among these subjects.
    """

    z: FloatArray
    x: FloatArray
    note: str = ""
    refusal: str = ""

    @property
    def df_term(self) -> int:
        return int(self.x.shape[1])

    @property
    def df_res(self) -> int:
        return int(self.z.shape[0] - self.z.shape[1] - self.x.shape[1])


def _rank(matrix: FloatArray) -> int:
    if matrix.size == 0:
        return 0
    s = np.linalg.svd(matrix, compute_uv=False)
    return int((s > _RANK_TOL * s[0]).sum()) if s.size and s[0] > 0 else 0


def _range_text(values: FloatArray) -> str:
    return f"{values.min():g}-{values.max():g}"


def _overlap_refusal(name: str, values: FloatArray, groups: IntArray, names: Sequence[str]) -> str:
    """Why the cohorts cannot be compared at equal ``name``: a cohort whose range lies
    wholly below or above the others' (then any adjusted difference is extrapolation)."""
    for k, cohort in enumerate(names):
        mine, rest = values[groups == k], values[groups != k]
        if mine.size and rest.size and (mine.max() < rest.min() or mine.min() > rest.max()):
            ranges = ", ".join(
                f"{c} {_range_text(values[groups == i])}"
                for i, c in enumerate(names)
                if (groups == i).any()
            )
            return (
                f"the cohorts do not overlap in {name} ({ranges}): {cohort} lies wholly "
                f"{'below' if mine.max() < rest.min() else 'above'} the others, so a cohort "
                f"effect cannot be told from a {name} effect without extrapolating the model; "
                "not tested"
            )
    return ""


def build_design(
    table: SubjectTable,
    rows: IntArray,
    groups: IntArray,
    names: Sequence[str],
) -> Design:
    """The design of ``cohort + covariates`` for the subjects at ``rows`` of ``table``.

    ``groups`` holds each subject's cohort code (0 .. len(names) - 1, every code
    present) and the rows must be complete. A covariate constant among these
    subjects is left out (``note``); the test is refused (``refusal``) when the
    cohorts do not overlap in a continuous covariate, when the covariates are
    collinear, when cohort is collinear with them, or when no residual degree of
    freedom is left.
    """
    n = int(rows.size)
    kept: list[str] = []
    constant: list[str] = []
    for cov in table.covariates:
        values = table.column(cov.name, rows)
        if np.unique(values).size <= 1:
            shown = f"{values[0]:g}" if cov.kind == "continuous" else cov.levels[int(values[0])]
            constant.append(f"{cov.name} ({shown})")
        else:
            kept.append(cov.name)
    note = ""
    if constant:
        note = f"left out of the model, the same for every subject here: {', '.join(constant)}"
    g = len(names)
    x = np.zeros((n, g - 1))
    for k in range(1, g):
        x[:, k - 1] = groups == k
    columns = design_columns(table, rows, kept)
    z = np.column_stack([np.ones(n), *(c for _, c in columns)]) if n else np.zeros((0, 1))

    def refused(reason: str) -> Design:
        return Design(z, x, note, reason)

    for name in kept:
        if table.kinds[name].kind == "continuous":
            why = _overlap_refusal(name, table.column(name, rows), groups, names)
            if why:
                return refused(why)
    q = z.shape[1]
    if _rank(z) < q:
        labels = ", ".join(label for label, _ in columns)
        return refused(
            f"the covariates are collinear among these subjects (design columns {labels} "
            f"have rank {_rank(z) - 1} of {q - 1}); drop one of them; not tested"
        )
    if _rank(np.column_stack([z, x])) < q + g - 1:
        return refused(
            f"cohort is collinear with the covariates ({', '.join(kept)}): every level "
            "combination they take belongs to one cohort, so the cohort effect cannot be "
            "separated from them; not tested"
        )
    if n - q - (g - 1) < 1:
        return refused(
            f"no residual degrees of freedom: {n} subjects for {q} covariate columns and "
            f"{g - 1} cohort column(s); not tested"
        )
    return Design(z, x, note, "")


@dataclass(frozen=True)
class Marginal:
    """The marginal test of the cohort term, per response group (arrays of length G)."""

    f: FloatArray  # pseudo-F (F for one column) of the cohort term given the covariates
    ss_term: FloatArray  # the term's marginal sum of squares
    rss: FloatArray  # the full model's residual sum of squares
    ss_total: FloatArray  # sum of squares about the mean (the response's total)
    exceed: IntArray  # permutations with F >= the observed F
    permutations: int
    df_term: int
    df_res: int

    @property
    def p_value(self) -> FloatArray:
        return np.asarray((1.0 + self.exceed) / (1.0 + self.permutations), dtype=np.float64)


def _f(ss_term: FloatArray, rss: FloatArray, df_term: int, df_res: int) -> FloatArray:
    f = np.full(ss_term.shape, np.inf)
    np.divide(ss_term / df_term, rss / df_res, out=f, where=rss > 0)
    f[(rss <= 0) & (ss_term <= 0)] = 0.0
    return f


def marginal_test(
    design: Design,
    responses: FloatArray,
    groups: IntArray,
    *,
    permutations: int,
    rng: np.random.Generator,
    strata: npt.NDArray[np.integer] | None = None,
) -> Marginal:
    """F of the cohort term given the covariates, and its Freedman-Lane permutation counts.

    ``responses`` is n x C; ``groups`` gives each column's response (0 .. G-1): the
    squares of a response's columns are summed (a feature space), and every response
    shares the same permutations. See the module notes for the derivation.
    """
    n, columns = responses.shape
    count = int(groups.max()) + 1 if groups.size else 0
    onehot = np.zeros((columns, count))
    onehot[np.arange(columns), groups] = 1.0
    qz, _ = np.linalg.qr(design.z)
    xr = design.x - qz @ (qz.T @ design.x)
    w, _ = np.linalg.qr(xr)
    centred = responses - responses.mean(axis=0)
    ss_total = (centred * centred).sum(axis=0) @ onehot
    del centred
    resid = responses - qz @ (qz.T @ responses)
    total = (resid * resid).sum(axis=0) @ onehot
    term_obs = w.T @ resid
    ss_term = (term_obs * term_obs).sum(axis=0) @ onehot
    rss = total - ss_term
    rss[rss <= _RSS_ROUNDING * total] = 0.0
    df_term, df_res = design.df_term, design.df_res
    f_obs = _f(ss_term, rss, df_term, df_res)
    threshold = np.where(
        np.isfinite(f_obs), f_obs - _PERM_TOL * np.maximum(1.0, np.abs(f_obs)), f_obs
    )
    exceed = np.zeros(count, dtype=np.int64)
    # E is orthogonal to the intercept, so Q_Z's first (constant) column drops out
    basis = np.ascontiguousarray(np.hstack([qz[:, 1:], w]).T)  # k x n
    k, covariate_columns = basis.shape[0], qz.shape[1] - 1
    for idx in permutation_blocks(n, permutations, rng, strata):
        # sum_i b[idx[i]] resid[i] = b' resid[inverse of idx]: the statistic of the
        # residuals permuted by the inverse, itself a uniform (within-strata) draw; all
        # basis columns of a block in one matrix product (k rows x n times n x C)
        rows = idx.shape[0]
        products = (basis[:, idx].reshape(k * rows, n) @ resid).reshape(k, rows, columns)
        squares = (products * products) @ onehot  # k x rows x responses
        fitted = squares.sum(axis=0)
        term = squares[covariate_columns:].sum(axis=0)
        rss_p = total - fitted
        rss_p[rss_p <= _RSS_ROUNDING * total] = 0.0
        exceed += (_f(term, rss_p, df_term, df_res) >= threshold).sum(axis=0)
    return Marginal(f_obs, ss_term, rss, ss_total, exceed, permutations, df_term, df_res)
