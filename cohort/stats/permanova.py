"""PERMANOVA on cosine distances: do cohorts differ in feature space as a whole?

No CI is given (NaN): resampling subjects with replacement puts zero
distances between copies, which inflates R².
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from cohort.errors import StatsInputError
from cohort.stats.common import (
    FloatArray,
    IntArray,
    Result,
    dropped_note,
    join_notes,
    skipped,
    small_groups_note,
)
from cohort.stats.tables import unit_rows

__all__ = ["cosine_distances", "permanova", "pseudo_f"]

# Relative tolerance when counting permuted pseudo-F values >= the observed one,
# so that a permutation reproducing the observed partition counts despite
# rounding (vegan's permutation tests also compare with a small tolerance).
_PERM_TOL: Final = 1e-10
# Cosine distances at or below this are rounding: all vectors point one way.
_SAME_DIRECTION: Final = 1e-12


def cosine_distances(vectors: npt.ArrayLike) -> FloatArray:
    """Cosine distance 1 - cos between every two rows (rows must have non-zero norm).

    Bit-identical rows (and the diagonal) get exactly 0.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    unit, valid = unit_rows(matrix)
    if not valid.all():
        raise StatsInputError("cosine distance needs finite rows of non-zero norm")
    dist = 1.0 - np.clip(unit @ unit.T, -1.0, 1.0)
    _, twin = np.unique(matrix, axis=0, return_inverse=True)
    dist[twin[:, None] == twin[None, :]] = 0.0  # identical rows: exactly 0, not rounding
    return dist


def pseudo_f(
    dist_sq: FloatArray, labels: IntArray, sizes: IntArray, chunk: int = 256
) -> tuple[FloatArray, FloatArray]:
    """PERMANOVA pseudo-F and R² for each row of ``labels`` (label arrays, P x N).

    Anderson (2001): SS_T = (1/N) sum_{i<j} d_ij^2, SS_W = sum_g (1/n_g)
    sum_{i<j in g} d_ij^2, SS_A = SS_T - SS_W, F = (SS_A/(g-1)) / (SS_W/(N-g)),
    R² = SS_A / SS_T. Within sums come from one matrix product per chunk:
    sum_{i,j in g} d_ij^2 = o_g' D o_g with o_g the indicator of group g.
    """
    n = dist_sq.shape[0]
    g = sizes.size
    ss_total = dist_sq.sum() / (2.0 * n)
    f_values = np.empty(labels.shape[0])
    r2 = np.empty(labels.shape[0])
    eye = np.eye(g)
    for start in range(0, labels.shape[0], chunk):
        block = labels[start : start + chunk]
        onehot = eye[block]  # P x N x g
        within_pairs = np.einsum("png,png->pg", onehot, np.matmul(dist_sq, onehot)) / 2.0
        ss_within = (within_pairs / sizes).sum(axis=1)
        ss_among = ss_total - ss_within
        among_ms = ss_among / (g - 1)
        within_ms = ss_within / (n - g)
        f = np.full(block.shape[0], np.inf)
        np.divide(among_ms, within_ms, out=f, where=within_ms > 0)
        f[(within_ms <= 0) & (among_ms <= 0)] = 0.0
        f_values[start : start + block.shape[0]] = f
        r2[start : start + block.shape[0]] = ss_among / ss_total
    return f_values, r2


def permanova(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    min_n: int,
    permutations: int,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
) -> Result:
    """Permutation test (PERMANOVA) of group differences in feature vectors.

    Asks whether subjects' region vectors differ between cohorts as a whole
    (direction in feature space), not only through one summary number.
    The squared distance between two subjects is the cosine distance 1 - cos
    of their vectors (half the squared Euclidean distance between the unit
    vectors); the statistic is Anderson's (2001) pseudo-F (see :func:`pseudo_f`). The
    permuted label arrays are drawn as
    ``rng.permuted(np.tile(labels, (permutations, 1)), axis=1)``; the p-value
    is (1 + #{F_perm >= F_obs}) / (1 + permutations), counting F_perm within
    a relative 1e-10 of F_obs as equal. Rows that are non-finite or of zero
    norm are dropped (count in ``reason``). Skipped when a group has fewer than
    ``min_n`` subjects, there are no within-group degrees of freedom, all
    vectors point the same way, or ``permutations`` is 0.

    Effect: R² = SS_among / SS_total, the share of the distance variation
    explained by cohort (0 to 1; under the null it is about (g-1)/(N-1)). No
    CI (NaN): see the module notes.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    codes = np.asarray(labels, dtype=np.int64)
    if matrix.ndim != 2 or codes.shape != (matrix.shape[0],):
        raise StatsInputError(
            f"permanova needs N x C vectors and N labels, got {matrix.shape} and {codes.shape}"
        )
    if codes.size and codes.min() < 0:
        raise StatsInputError("permanova labels must be group codes 0, 1, ...")
    g = int(codes.max()) + 1 if codes.size else 0
    group_names = list(names) if names is not None else [f"group {i + 1}" for i in range(g)]
    if len(group_names) != g:
        raise StatsInputError(f"permanova got {len(group_names)} names for {g} group codes")
    _, valid = unit_rows(matrix)
    dropped = dropped_note(int((~valid).sum()), "a zero-norm or non-finite vector")
    matrix, codes = matrix[valid], codes[valid]
    sizes = np.bincount(codes, minlength=g).astype(np.int64)
    n = int(codes.size)
    small = small_groups_note([int(s) for s in sizes], group_names, min_n)
    if g < 2:
        return skipped(n, join_notes(dropped, "one cohort"))
    if small:
        return skipped(n, join_notes(dropped, small), below_min_n=True)
    if n - g < 1:
        return skipped(n, join_notes(dropped, "no within-group degrees of freedom (N = groups)"))
    if permutations < 1:
        return skipped(n, join_notes(dropped, "permutations is 0"))
    # Anderson's formula takes squared distances. The cosine distance 1 - cos of
    # two vectors is half the squared Euclidean distance between their unit
    # vectors, so it *is* a squared Euclidean distance: the sums of squares
    # partition (SS_T = SS_W + SS_A, with SS_A >= 0 and F >= 0). Squaring it
    # again would give a non-Euclidean measure whose SS_A can turn negative.
    dist_sq = cosine_distances(matrix)
    if not (dist_sq > _SAME_DIRECTION).any():
        return skipped(n, join_notes(dropped, "all vectors point the same way (zero distances)"))
    f_obs_arr, r2_obs = pseudo_f(dist_sq, codes[None, :], sizes)
    f_obs = float(f_obs_arr[0])
    shuffled = rng.permuted(np.tile(codes, (permutations, 1)), axis=1)
    f_perm, _ = pseudo_f(dist_sq, shuffled, sizes)
    threshold = f_obs - _PERM_TOL * max(1.0, abs(f_obs)) if np.isfinite(f_obs) else f_obs
    exceed = int((f_perm >= threshold).sum())
    p_value = (1.0 + exceed) / (1.0 + permutations)
    nan = float("nan")
    return Result(n, f_obs, p_value, float(r2_obs[0]), nan, nan, "ok", dropped)
