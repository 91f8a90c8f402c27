"""The vectorised bootstrap CIs of the rank tests, against scipy called on each resample.

Each reference replays the same random draws as the code under test (the same
generator, seed and calls, in the same order), computes the effect size of
every resample with scipy's own test statistic in a plain loop, and takes the
percentile interval with numpy. Values are made with ties, so the tie
corrections matter.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from cohort import stats

pytestmark = pytest.mark.timeout(120)

B = 400  # resamples


def percentile_interval(values: list[float], level: float) -> tuple[float, float]:
    finite = np.asarray([v for v in values if np.isfinite(v)])
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def tied(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Values on a 0.5 grid, so samples and resamples hold many ties."""
    return np.round(2.0 * rng.normal(shift, 1.0, n)) / 2.0


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_mann_whitney_ci_equals_scipy_on_each_resample(level: float) -> None:
    data = np.random.default_rng(1)
    x, y = tied(data, 9, 0.6), tied(data, 13)
    assert np.intersect1d(x, y).size  # ties between the groups
    result = stats.mann_whitney(
        x, y, min_n=3, bootstrap=B, rng=np.random.default_rng(42), level=level
    )
    draws = np.random.default_rng(42)
    ix = draws.integers(0, x.size, size=(B, x.size))
    iy = draws.integers(0, y.size, size=(B, y.size))
    r = [
        2.0 * sps.mannwhitneyu(x[a], y[b]).statistic / (x.size * y.size) - 1.0
        for a, b in zip(ix, iy, strict=True)
    ]
    low, high = percentile_interval(r, level)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert result.ci_low < result.effect_size < result.ci_high


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_kruskal_wallis_ci_equals_scipy_on_each_resample(level: float) -> None:
    data = np.random.default_rng(2)
    groups = [tied(data, 7, 0.8), tied(data, 9), tied(data, 11, -0.5)]
    result = stats.kruskal_wallis(
        groups, min_n=3, bootstrap=B, rng=np.random.default_rng(43), level=level
    )
    draws = np.random.default_rng(43)
    index = [draws.integers(0, g.size, size=(B, g.size)) for g in groups]
    total = sum(g.size for g in groups)
    eps = []
    for b in range(B):
        resample = [g[i[b]] for g, i in zip(groups, index, strict=True)]
        if np.all(np.concatenate(resample) == resample[0][0]):
            eps.append(float("nan"))  # H is undefined when every value is equal
            continue
        eps.append(sps.kruskal(*resample).statistic / (total - 1))
    low, high = percentile_interval(eps, level)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_friedman_ci_equals_scipy_on_each_resample(level: float) -> None:
    data = np.random.default_rng(3)
    n, k = 12, 4
    matrix = np.round(2.0 * (data.normal(0.0, 1.0, (n, k)) + np.linspace(0, 0.8, k))) / 2.0
    assert any(len(set(row)) < k for row in matrix)  # ties within subjects
    result = stats.friedman_depth(
        matrix, min_n=3, bootstrap=B, rng=np.random.default_rng(44), level=level
    )
    draws = np.random.default_rng(44)
    index = draws.integers(0, n, size=(B, n))
    w = [sps.friedmanchisquare(*matrix[i].T).statistic / (n * (k - 1)) for i in index]
    low, high = percentile_interval(w, level)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_wilcoxon_ci_equals_scipy_on_each_resample(level: float) -> None:
    data = np.random.default_rng(4)
    x = tied(data, 15, 0.4)
    y = tied(data, 15)
    y[:2] = x[:2]  # two zero differences, left out of the ranks as the test documents
    result = stats.wilcoxon_pairs(
        x, y, min_n=3, bootstrap=B, rng=np.random.default_rng(45), level=level
    )
    d = x - y
    draws = np.random.default_rng(45)
    r = []
    for i in draws.integers(0, d.size, size=(B, d.size)):
        sample = d[i]
        m = int(np.count_nonzero(sample))
        if m == 0:
            r.append(float("nan"))
            continue
        # scipy's one-sided statistic is T+, the rank sum of the positive differences
        t_plus = sps.wilcoxon(sample, zero_method="wilcox", alternative="greater").statistic
        total = m * (m + 1) / 2.0
        r.append((2.0 * t_plus - total) / total)
    low, high = percentile_interval(r, level)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-12)
