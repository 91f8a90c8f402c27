"""PERMANOVA on cosine distances: do cohorts differ in feature space as a whole?

Linear in the number of subjects: the pseudo-F of a labelling comes from the
group sums of the unit vectors (:func:`pseudo_f`), never from the N x N
distance matrix (:func:`cosine_distances` builds that one, for small inputs).

No CI is given (NaN): resampling subjects with replacement puts zero
distances between copies, which inflates R².
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from cohort.errors import StatsInputError
from cohort.stats.adjusted.permute import permutation_blocks
from cohort.stats.bootstrap import BLOCK_VALUES
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
# SS_W at or below this share of SS_T is rounding of SS_T - SS_A: taken as 0.
_WITHIN_ROUNDING: Final = 1e-10
# Fewest label rows per matrix product (see _block_rows).
_MIN_ROWS: Final = 64


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
    centred: FloatArray, labels: npt.NDArray[np.integer], sizes: IntArray
) -> tuple[FloatArray, FloatArray]:
    """PERMANOVA pseudo-F and R² for each row of ``labels`` (group codes, P x N).

    ``centred`` holds the subjects' unit vectors minus their mean (N x C), and
    ``sizes`` the group sizes. With cosine distances no N x N matrix is
    needed. For unit vectors u_i, 1 - cos(u_i, u_j) = |u_i - u_j|^2 / 2, so
    1 - cos is a squared Euclidean distance and Anderson's (2001) sums of
    squares are sums of squared deviations from centroids. Write
    v_i = u_i - mean(u) (distances do not change under a shift), V_g = the sum
    of v_i over group g (n_g members) and use
    sum_{i<j} |x_i - x_j|^2 = m sum_i |x_i - mean(x)|^2 for any m points:

    - SS_T = (1/N) sum_{i<j} d_ij = (1/2N) sum_{i<j} |u_i - u_j|^2
      = (1/2) sum_i |v_i|^2 (= (N - |sum_i u_i|^2 / N) / 2, since |u_i| = 1);
    - SS_W = sum_g (1/n_g) sum_{i<j in g} d_ij
      = (1/2) sum_g sum_{i in g} |v_i - V_g / n_g|^2
      = (1/2) (sum_i |v_i|^2 - sum_g |V_g|^2 / n_g);
    - SS_A = SS_T - SS_W = (1/2) sum_g |V_g|^2 / n_g;
    - F = (SS_A / (g - 1)) / (SS_W / (N - g)), R² = SS_A / SS_T.

    SS_A is a sum of squares, so F >= 0 and R² in [0, 1] hold by
    construction; SS_W = SS_T - SS_A is set to 0 when it is below
    1e-10 SS_T (rounding: the groups are internally identical, where the
    distance form gives 0 and F = inf). The group sums of a block of label
    rows are one matrix product per group (indicator rows x N times N x C),
    and the last group's sum is the total minus the others: O(P N C) time,
    and memory for one block of rows (about
    :data:`~cohort.stats.bootstrap.BLOCK_VALUES` labels), not O(N^2).
    """
    n, channels = centred.shape
    g = int(sizes.size)
    rows = labels.shape[0]
    ss_total = 0.5 * float(np.einsum("ij,ij->", centred, centred))
    sums = np.empty((rows, g, channels))
    for k in range(g - 1):
        sums[:, k] = (labels == k).astype(np.float64) @ centred
    sums[:, g - 1] = centred.sum(axis=0) - sums[:, : g - 1].sum(axis=1)
    ss_among = 0.5 * (np.einsum("pgc,pgc->pg", sums, sums) / sizes).sum(axis=1)
    ss_within = ss_total - ss_among
    ss_within[ss_within <= _WITHIN_ROUNDING * ss_total] = 0.0
    among_ms = ss_among / (g - 1)
    within_ms = ss_within / (n - g)
    f = np.full(rows, np.inf)
    np.divide(among_ms, within_ms, out=f, where=within_ms > 0)
    f[(within_ms <= 0) & (among_ms <= 0)] = 0.0
    return f, ss_among / ss_total


def _block_rows(n: int) -> int:
    """Label rows per matrix product: about BLOCK_VALUES labels, and at least
    :data:`_MIN_ROWS` (skinny products are slow in threaded BLAS)."""
    return max(_MIN_ROWS, BLOCK_VALUES // max(n, 1))


def _spread(unit: FloatArray, matrix: FloatArray) -> bool:
    """Whether two rows are farther apart than :data:`_SAME_DIRECTION` (cosine distance).

    The same decision as asking :func:`cosine_distances` of the rows for any
    entry above it, in O(N C) unless the rows sit in a narrow band where
    bounds cannot decide. For any reference row r, d_ir is itself an entry,
    and every d_ij <= 4 max_k d_kr (triangle inequality on
    |u_i - u_j| = sqrt(2 d_ij)); the references are the first row and the
    row farthest from it. In the band (all rows within 1e-12 of each other's
    direction up to that factor 4: degenerate input) the pairs are checked a
    block of rows at a time: O(N^2 C) time, O(N) memory.
    """
    reference = 0
    for _ in range(2):
        dist = 1.0 - np.clip(unit @ unit[reference], -1.0, 1.0)
        dist[(matrix == matrix[reference]).all(axis=1)] = 0.0
        widest = float(dist.max())
        if widest > _SAME_DIRECTION:
            return True
        if 4.0 * widest <= _SAME_DIRECTION:
            return False
        reference = int(dist.argmax())
    _, twin = np.unique(matrix, axis=0, return_inverse=True)
    twin = twin.ravel()
    step = _block_rows(unit.shape[0])
    for start in range(0, unit.shape[0], step):
        stop = start + step
        dist = 1.0 - np.clip(unit[start:stop] @ unit.T, -1.0, 1.0)
        far = (dist > _SAME_DIRECTION) & (twin[start:stop, None] != twin[None, :])
        if far.any():
            return True
    return False


def permanova(
    vectors: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    min_n: int,
    permutations: int,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
    strata: npt.NDArray[np.integer] | None = None,
) -> Result:
    """Permutation test (PERMANOVA) of group differences in feature vectors.

    Asks whether subjects' region vectors differ between cohorts as a whole
    (direction in feature space), not only through one summary number.
    The squared distance between two subjects is the cosine distance 1 - cos
    of their vectors (half the squared Euclidean distance between the unit
    vectors); the statistic is Anderson's (2001) pseudo-F, computed from group
    centroids in O(N C) per permutation (see :func:`pseudo_f`). The
    permuted label arrays are drawn as
    ``rng.permuted(np.tile(labels, (permutations, 1)), axis=1)`` (in blocks of
    rows that hold the same values); the p-value
    is (1 + #{F_perm >= F_obs}) / (1 + permutations), counting F_perm within
    a relative 1e-10 of F_obs as equal. Rows that are non-finite or of zero
    norm are dropped (count in ``reason``). With ``strata`` (a code per subject)
    the labels are permuted within strata instead, drawn by
    :func:`cohort.stats.adjusted.permute.permutation_blocks`. Skipped when a group has fewer than
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
    unit, valid = unit_rows(matrix)
    dropped = dropped_note(int((~valid).sum()), "a zero-norm or non-finite vector")
    if not valid.all():
        matrix, codes, unit = matrix[valid], codes[valid], unit[valid]
        strata = None if strata is None else np.asarray(strata)[valid]
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
    if not _spread(unit, matrix):
        return skipped(n, join_notes(dropped, "all vectors point the same way (zero distances)"))
    centred = unit
    centred -= unit.mean(axis=0)  # in place: the unit vectors are not needed any more
    # rng.permuted shuffles row after row, so blocks of tiled rows drawn one after
    # the other hold exactly the rows of the one P x N call. The observed labels
    # ride in the first block, so F_obs and F_perm come from the same products.
    tiled = codes.astype(np.int8) if g <= np.iinfo(np.int8).max else codes
    if strata is not None:
        f_obs, r2_obs = (float(v[0]) for v in pseudo_f(centred, tiled[None, :], sizes))
        threshold = f_obs - _PERM_TOL * max(1.0, abs(f_obs)) if np.isfinite(f_obs) else f_obs
        exceed = 0
        for idx in permutation_blocks(n, permutations, rng, strata):
            f_perm, _ = pseudo_f(centred, tiled[idx], sizes)
            exceed += int((f_perm >= threshold).sum())
        nan = float("nan")
        p_value = (1.0 + exceed) / (1.0 + permutations)
        return Result(n, f_obs, p_value, r2_obs, nan, nan, "ok", dropped)
    step = _block_rows(n)
    first = min(permutations, step - 1)
    block = np.vstack([tiled, rng.permuted(np.tile(tiled, (first, 1)), axis=1)])
    f_values, r2_values = pseudo_f(centred, block, sizes)
    f_obs, r2_obs = float(f_values[0]), float(r2_values[0])
    threshold = f_obs - _PERM_TOL * max(1.0, abs(f_obs)) if np.isfinite(f_obs) else f_obs
    exceed = int((f_values[1:] >= threshold).sum())
    for start in range(first, permutations, step):
        rows = min(step, permutations - start)
        f_perm, _ = pseudo_f(centred, rng.permuted(np.tile(tiled, (rows, 1)), axis=1), sizes)
        exceed += int((f_perm >= threshold).sum())
    p_value = (1.0 + exceed) / (1.0 + permutations)
    nan = float("nan")
    return Result(n, f_obs, p_value, r2_obs, nan, nan, "ok", dropped)
