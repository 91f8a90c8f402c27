"""Covariates, strata and harmonisation of the between-cohort tests (issue 24).

======================  ==========================================================
:mod:`.covariates`      typed per-subject columns, missing values, design columns
:mod:`.permute`         permutations in blocks, free or within strata
:mod:`.model`           design checks, marginal (type II) F, Freedman-Lane counts
:mod:`.linear`          Freedman-Lane tests of cosines, partial eta squared CI
:mod:`.margin`          PERMANOVA with covariates (adonis2 by margin), linear in N
:mod:`.combat`          ComBat fit and apply, as neuroCombat defines it
:mod:`.harmonise`       features table <-> pooled matrix, site effect summary
:mod:`.rows`            the adjusted families' rows; stratified PERMANOVA
======================  ==========================================================
"""

from cohort.stats.adjusted.combat import ComBatModel, combat_fit
from cohort.stats.adjusted.covariates import SubjectTable, subject_table
from cohort.stats.adjusted.linear import freedman_lane
from cohort.stats.adjusted.margin import permanova_margin
from cohort.stats.adjusted.permute import permutation_blocks
from cohort.stats.adjusted.rows import ADJUSTED_FAMILIES

__all__ = [
    "ADJUSTED_FAMILIES",
    "ComBatModel",
    "SubjectTable",
    "combat_fit",
    "freedman_lane",
    "permanova_margin",
    "permutation_blocks",
    "subject_table",
]
