"""ICC(1,1), ICC(2,1), ICC(3,1) and their CIs against pingouin and Shrout & Fleiss (1979)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohort.errors import StatsInputError
from cohort.stats.icc import FORMS, icc, mean_squares

pytestmark = pytest.mark.timeout(120)

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
    dtype=np.float64,
)
PINGOUIN_TYPES = ("ICC(1,1)", "ICC(A,1)", "ICC(C,1)")  # McGraw & Wong's names of FORMS


def pingouin_icc(table: np.ndarray) -> pd.DataFrame:
    """pingouin's ICC table of an n x k array, CIs unrounded."""
    import pingouin as pg

    n, k = table.shape
    long = pd.DataFrame(
        [(i, j, table[i, j]) for i in range(n) for j in range(k)],
        columns=["subject", "perturbation", "value"],
    )
    rounding = pg.options.pop("round.column.CI95", None)  # pingouin prints CIs to 2 places
    try:
        out = pg.intraclass_corr(long, "subject", "perturbation", "value")
    finally:
        if rounding is not None:
            pg.options["round.column.CI95"] = rounding
    return out.set_index("Type").loc[list(PINGOUIN_TYPES)]


def test_every_form_and_interval_equals_pingouin_to_1e_9() -> None:
    rng = np.random.default_rng(2026)
    worst = 0.0
    for n, k in [(3, 2), (5, 3), (8, 4), (12, 11), (20, 10), (40, 2)]:
        # 6 tables of one shape in one vectorised call: subject, rater and noise parts
        tables = (
            rng.normal(size=(6, n, 1)) * rng.uniform(0.0, 3.0, (6, 1, 1))
            + rng.normal(size=(6, 1, k)) * rng.uniform(0.0, 2.0, (6, 1, 1))
            + rng.normal(size=(6, n, k))
        )
        forms = icc(tables)
        for t, table in enumerate(tables):
            reference = pingouin_icc(table)
            for f in range(len(FORMS)):
                low, high = reference["CI95"].iloc[f]
                diffs = [
                    forms.icc[f, t] - reference["ICC"].iloc[f],
                    forms.low[f, t] - low,
                    forms.high[f, t] - high,
                ]
                worst = max(worst, float(np.max(np.abs(diffs))))
    print(f"worst difference against pingouin: {worst:.3g}")
    assert worst < 1e-9


def test_mean_squares_of_shrout_and_fleiss_by_hand() -> None:
    x = SHROUT_FLEISS
    n, k = x.shape
    grand = sum(sum(row) for row in x) / (n * k)
    row_means = [sum(row) / k for row in x]
    col_means = [sum(x[i][j] for i in range(n)) / n for j in range(k)]
    ss_total = sum((x[i][j] - grand) ** 2 for i in range(n) for j in range(k))
    ss_rows = k * sum((m - grand) ** 2 for m in row_means)
    ss_cols = n * sum((m - grand) ** 2 for m in col_means)
    bms = ss_rows / (n - 1)
    wms = (ss_total - ss_rows) / (n * (k - 1))
    jms = ss_cols / (k - 1)
    ems = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    # the published mean squares (Shrout & Fleiss 1979, Table 2)
    assert (round(bms, 2), round(wms, 2), round(jms, 2), round(ems, 2)) == (
        11.24,
        6.26,
        32.49,
        1.02,
    )
    ms = mean_squares(x)
    assert ms.msr == pytest.approx(bms, abs=1e-12)
    assert ms.msw == pytest.approx(wms, abs=1e-12)
    assert ms.msc == pytest.approx(jms, abs=1e-12)
    assert ms.mse == pytest.approx(ems, abs=1e-12)
    # ICC(1,1), ICC(2,1), ICC(3,1) from these by the paper's formulas, and its Table 4
    by_hand = [
        (bms - wms) / (bms + (k - 1) * wms),
        (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n),
        (bms - ems) / (bms + (k - 1) * ems),
    ]
    forms = icc(x)
    assert forms.icc == pytest.approx(by_hand, abs=1e-12)
    assert [round(float(v), 2) for v in forms.icc] == [0.17, 0.29, 0.71]


def test_perfect_agreement_is_one_and_no_variation_is_no_icc() -> None:
    subjects = np.arange(5.0)[:, None] * np.ones((1, 4))
    forms = icc(np.stack([subjects, np.full((5, 4), 3.0)]))
    assert forms.icc[:, 0] == pytest.approx([1.0, 1.0, 1.0])
    assert not forms.constant[0]
    assert forms.constant[1] and np.isnan(forms.icc[:, 1]).all()


def test_unusable_tables_are_refused() -> None:
    with pytest.raises(StatsInputError, match="2 subjects and 2 measurements"):
        icc(np.ones((1, 5)))
    with pytest.raises(StatsInputError, match="finite"):
        icc(np.array([[1.0, np.nan], [2.0, 3.0]]))
