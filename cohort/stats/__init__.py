"""The reducer's statistics: pure functions, tables in and tables out.

One statistical concern per module:

======================  ==========================================================
:mod:`.tables`          features -> cosine table (raw and centred); table checks
:mod:`.summaries`       n, mean, sd, median, bootstrap CI per cohort x layer x pair;
                        the origin study's table (what ``similarity.csv`` holds)
:mod:`.flags`           sanity flags: suspicious values, one row each
:mod:`.effects`         effect sizes (rank-biserial, Kendall's W, epsilon-squared)
:mod:`.bootstrap`       seeded percentile bootstrap
:mod:`.ranktests`       Wilcoxon, Friedman, Mann-Whitney, Kruskal-Wallis (scipy)
:mod:`.permanova`       PERMANOVA on cosine distances
:mod:`.fdr`             Benjamini-Hochberg q-values
:mod:`.families`        which tests a run makes, with flags and q-values
:mod:`.adjusted`        covariates, strata and ComBat: the adjusted families
======================  ==========================================================

Conventions shared by every module are in :mod:`.common`.
"""

from cohort.errors import StatsInputError
from cohort.stats.common import Result, rng_for
from cohort.stats.effects import (
    epsilon_squared,
    kendalls_w,
    rank_biserial_paired,
    rank_biserial_unpaired,
)
from cohort.stats.families import FAMILIES, run_tests
from cohort.stats.fdr import bh_qvalues
from cohort.stats.flags import sanity_flags
from cohort.stats.permanova import cosine_distances, permanova
from cohort.stats.ranktests import friedman_depth, kruskal_wallis, mann_whitney, wilcoxon_pairs
from cohort.stats.summaries import origin_table, summarise
from cohort.stats.tables import chosen_cosines, cosine_table

__all__ = [
    "FAMILIES",
    "Result",
    "StatsInputError",
    "bh_qvalues",
    "chosen_cosines",
    "cosine_distances",
    "cosine_table",
    "epsilon_squared",
    "friedman_depth",
    "kendalls_w",
    "kruskal_wallis",
    "mann_whitney",
    "origin_table",
    "permanova",
    "rank_biserial_paired",
    "rank_biserial_unpaired",
    "rng_for",
    "run_tests",
    "sanity_flags",
    "summarise",
    "wilcoxon_pairs",
]
