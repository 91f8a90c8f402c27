"""Error rates of the adjusted test by simulation (issue 24).

Age drives both cohort membership and the cosine; there is no cohort effect.
The unadjusted Mann-Whitney test then "finds" the age difference between the
cohorts, while the Freedman-Lane test of the cohort term given age keeps its
level; with a real cohort effect it has power.

1,000 seeded data sets: 20 designs (ages and cohorts) x 50 cosine columns each.
The columns of one design go through one call (they share its permutations,
each p-value valid on its own), which keeps the test to a few seconds.
199 permutations: (1 + count) / 200 <= 0.05 exactly when at most 9 of 199
permuted F reach the observed one, so under exchangeability the test's size is
exactly 5 % and the permutation count adds no rounding to the level.
With 1,000 data sets the standard error of a 5 % rate is 0.7 %, so 5 % +- 2 %
is about +- 3 standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from cohort.config import AdjustConfig
from cohort.stats.adjusted.covariates import subject_table
from cohort.stats.adjusted.linear import freedman_lane
from cohort.stats.adjusted.model import build_design
from cohort.stats.ranktests import mann_whitney

pytestmark = pytest.mark.timeout(300)

DESIGNS, COLUMNS, N = 20, 50, 60
PERMUTATIONS = 199
AGE_SLOPE = 0.0008  # cosine per year of age
NOISE = 0.02
EFFECT = 0.02  # the real cohort effect of the power case (1 noise SD)


def simulate(effect: float, seed: int) -> tuple[float, float]:
    """(rejection rate of the unadjusted Mann-Whitney, of the adjusted Freedman-Lane)."""
    rng = np.random.default_rng(seed)
    unadjusted = adjusted = total = 0
    for _ in range(DESIGNS):
        while True:  # ages and a cohort membership that rises with age
            age = rng.uniform(20.0, 80.0, N)
            osteo = rng.random(N) < 1.0 / (1.0 + np.exp(-(age - 50.0) / 7.0))
            if 10 <= osteo.sum() <= N - 10:
                break
        codes = osteo.astype(np.int64)
        ids = [f"s{i:02d}" for i in range(N)]
        table = subject_table(
            ids, {"age": [str(float(a)) for a in age]}, AdjustConfig(("age",)), "sim"
        )
        design = build_design(table, table.rows(ids), codes, ("control", "osteo"))
        assert not design.refusal
        y = 0.85 + AGE_SLOPE * (age - 50.0)[:, None] + effect * codes[:, None]
        y = y + rng.normal(0.0, NOISE, (N, COLUMNS))
        marginal, _, _ = freedman_lane(
            design, y, codes, permutations=PERMUTATIONS, bootstrap=0, rng=rng
        )
        adjusted += int((marginal.p_value <= 0.05).sum())
        for j in range(COLUMNS):
            result = mann_whitney(y[codes == 0, j], y[codes == 1, j], min_n=3, bootstrap=0, rng=rng)
            unadjusted += int(result.p_value <= 0.05)
        total += COLUMNS
    return unadjusted / total, adjusted / total


def test_adjusted_test_keeps_its_level_where_the_unadjusted_one_does_not() -> None:
    unadjusted, adjusted = simulate(0.0, seed=2024)
    print(f"no cohort effect: unadjusted Mann-Whitney rejects {unadjusted:.1%}, "
          f"Freedman-Lane {adjusted:.1%}")  # fmt: skip
    assert unadjusted > 0.3  # far above 5 %: age is mistaken for a cohort effect
    assert 0.03 <= adjusted <= 0.07


def test_adjusted_test_has_power_with_a_real_cohort_effect() -> None:
    _, power = simulate(EFFECT, seed=2025)
    print(f"cohort effect {EFFECT} (1 noise SD): Freedman-Lane power {power:.1%}")
    assert power > 0.5
