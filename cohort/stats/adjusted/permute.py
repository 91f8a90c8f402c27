"""Permutations in blocks, free or within strata (vegan's ``strata``, permute's ``blocks``).

A permutation is an index array ``idx`` of the subjects: the permuted data
are ``data[idx]``. Within strata, ``idx[i]`` is always a subject of the same
stratum as ``i``, so no permutation mixes two strata (Anderson & ter Braak
2003: restricted permutations for blocked designs). Blocks of rows are drawn
one after the other, each with ``rng.permuted`` on the tiled positions of one
stratum at a time (strata in code order), about
:data:`~cohort.stats.bootstrap.BLOCK_VALUES` indices per block: memory stays
linear in the number of subjects however many permutations are asked for.

References
----------
Anderson, M. J., & ter Braak, C. J. F. (2003). Permutation tests for
multi-factorial analysis of variance. Journal of Statistical Computation and
Simulation, 73(2), 85-113.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from cohort.errors import StatsInputError
from cohort.stats.bootstrap import block_rows
from cohort.stats.common import IntArray

__all__ = ["permutation_blocks", "strata_note"]

# the note of a test that cannot run within its strata (each stratum holds one group)
ONE_GROUP_PER_STRATUM = "every stratum holds one cohort, so no permutation can change the cohorts"


def permutation_blocks(
    n: int,
    count: int,
    rng: np.random.Generator,
    strata: npt.NDArray[np.integer] | None = None,
) -> Iterator[IntArray]:
    """``count`` random permutations of ``n`` subjects, as blocks of rows (rows x n).

    Parameters
    ----------
    n : int
        Number of subjects.
    count : int
        Number of permutations in all.
    rng : numpy.random.Generator
        The test's own generator.
    strata : array of int, optional
        A stratum code per subject; each permutation moves subjects only within
        their stratum. None permutes freely.

    Returns
    -------
    iterator of ndarray
        Blocks of index rows, int64, ``count`` rows in all.
    """
    groups: list[IntArray]
    if strata is None:
        groups = [np.arange(n, dtype=np.int64)]
    else:
        codes = np.asarray(strata)
        if codes.shape != (n,):
            raise StatsInputError(f"strata need one code per subject: {codes.shape} for n={n}")
        groups = [np.flatnonzero(codes == c).astype(np.int64) for c in np.unique(codes)]
    step = block_rows(n, count)
    for start in range(0, count, step):
        rows = min(step, count - start)
        block = np.empty((rows, n), dtype=np.int64)
        for members in groups:
            block[:, members] = rng.permuted(np.tile(members, (rows, 1)), axis=1)
        yield block


def strata_note(
    column: str, strata: npt.NDArray[np.integer], groups: npt.ArrayLike
) -> tuple[str, bool]:
    """What a row says about its strata (the column and its number of levels), and
    whether some stratum holds two groups: when none does, no permutation can change
    the grouping and the test cannot run (:data:`ONE_GROUP_PER_STRATUM`)."""
    codes = np.asarray(strata)
    labels = np.asarray(groups)
    levels = np.unique(codes)
    mixed = any(np.unique(labels[codes == c]).size > 1 for c in levels)
    return f"permutations within strata of {column} ({levels.size} levels)", mixed
