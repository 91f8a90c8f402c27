"""PERMANOVA with covariates on cosine distances, as vegan's ``adonis2(..., by = "margin")``.

adonis2 fits the model to the Gower-centred matrix G = -1/2 C D C of the squared
distances D (C the centring matrix): a term's marginal sum of squares is
tr(H_full G) - tr(H_without G), the residual tr((I - H_full) G), and its
pseudo-F and R² follow as in an ANOVA table (McArdle & Anderson 2001). Here the
squared distance is the cosine distance 1 - cos (as in the unadjusted
PERMANOVA, :mod:`cohort.stats.permanova`), and for unit vectors u_i,
1 - cos(u_i, u_j) = |u_i - u_j|^2 / 2: so G = V V' with V the unit vectors,
centred, over sqrt(2), and tr(H G) = |H V|^2. Every adonis2 fit is then the
least-squares fit of the matrix V itself, which :func:`marginal_test` does in
O(n C) per permutation: never the n x n matrix. The p-value permutes the
residuals of the model without the cohort term (vegan's default
``permutest.cca(model = "reduced")``), within strata when given.

No CI is given (NaN): resampling subjects with replacement puts zero
distances between copies, which inflates R² (as for the unadjusted PERMANOVA).

References
----------
McArdle, B. H., & Anderson, M. J. (2001). Fitting multivariate models to
community data: a comment on distance-based redundancy analysis. Ecology,
82(1), 290-297.

Oksanen, J., et al. (2022). vegan: Community Ecology Package, R package version
2.6-4, functions ``adonis2`` and ``permutest.cca``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from cohort.stats.adjusted.model import Design, Marginal, marginal_test
from cohort.stats.common import FloatArray

__all__ = ["permanova_margin"]


def permanova_margin(
    design: Design,
    spaces: Sequence[FloatArray],
    *,
    permutations: int,
    rng: np.random.Generator,
    strata: npt.NDArray[np.integer] | None = None,
) -> tuple[Marginal, FloatArray]:
    """Marginal pseudo-F and R² of the cohort term in each feature space.

    Parameters
    ----------
    design : Design
        The model of these subjects (cohort + covariates), not refused.
    spaces : sequence of ndarray
        Each feature space's unit vectors (n x C, rows of norm 1, same subjects
        in the same order); all share one set of permutations.
    permutations : int
        Permutations of the reduced model's residuals.
    rng : numpy.random.Generator
        The generator of these tests.
    strata : ndarray of int, optional
        Permutations stay within these strata.

    Returns
    -------
    marginal : Marginal
        Pseudo-F (``f``), the cohort term's marginal SS, the residual SS, the
        total SS and the permutation counts, one entry per space.
    r_squared : ndarray
        The term's marginal SS over the total SS, per space.
    """
    responses = np.hstack([np.asarray(u, dtype=np.float64) for u in spaces]) / np.sqrt(2.0)
    groups = np.repeat(np.arange(len(spaces)), [np.asarray(u).shape[1] for u in spaces])
    marginal = marginal_test(
        design, responses, groups, permutations=permutations, rng=rng, strata=strata
    )
    r_squared = np.full(marginal.ss_term.shape, np.nan)
    np.divide(marginal.ss_term, marginal.ss_total, out=r_squared, where=marginal.ss_total > 0)
    return marginal, r_squared
