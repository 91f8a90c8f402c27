"""False discovery rate: Benjamini-Hochberg adjusted p-values."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cohort.errors import StatsInputError
from cohort.stats.common import FloatArray

__all__ = ["bh_qvalues"]


def bh_qvalues(p_values: npt.ArrayLike) -> FloatArray:
    """Benjamini-Hochberg (1995) adjusted p-values (q-values), same order as the input.

    q_(i) = min_{j >= i} min(1, m p_(j) / j) over the ascending p-values
    p_(1) <= ... <= p_(m). NaN entries are left out of m and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = present.size
    if m == 0:
        return out
    if np.any((p[present] < 0) | (p[present] > 1)):
        raise StatsInputError("p-values must lie in [0, 1]")
    order = present[np.argsort(p[present], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.minimum(q, 1.0)
    return out
