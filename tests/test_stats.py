"""Tests of cohort.stats: every number checked against scipy/numpy or a hand count.

References are computed here, independently, from the input tables: p-values
with scipy directly, the permutation test with a slow loop, effect sizes from
their textbook formulas on cases small enough to do by hand.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cohort import stats
from cohort.config import StatsConfig
from cohort.errors import ConfigError
from cohort.outputs import schemas

LAYERS = ("conv-1", "conv-3", "conv-5")
REGIONS = ("tibia", "femur", "background")
CFG = StatsConfig(bootstrap=200, permutations=199, seed=7)


# --------------------------------------------------------------------------- builders


def make_features(
    sizes: dict[str, int],
    *,
    dim: int = 8,
    seed: int = 0,
    shift: dict[str, float] | None = None,
    layers: tuple[str, ...] = LAYERS,
    regions: tuple[str, ...] = REGIONS,
) -> pd.DataFrame:
    """A features table: positive vectors around a shared direction, per cohort shift."""
    rng = np.random.default_rng(seed)
    shift = shift or {}
    direction = np.zeros(dim)
    direction[0] = 1.0
    rows = []
    for cohort, n in sizes.items():
        for s in range(n):
            for layer in layers:
                for region in regions:
                    vector = 2.0 + np.abs(rng.normal(size=dim))
                    vector = vector + shift.get(cohort, 0.0) * direction
                    rows.append(
                        {
                            "subject_id": f"{cohort}-{s:03d}",
                            "cohort": cohort,
                            "region": region,
                            "layer": layer,
                            "layer_name": f"features.{layer}",
                            "channels": dim,
                            "voxels": 100,
                            "vector": vector.astype(np.float32),
                        }
                    )
    return pd.DataFrame(rows)


def make_similarity(
    sizes: dict[str, int],
    *,
    seed: int = 0,
    layers: tuple[str, ...] = LAYERS,
    regions: tuple[str, ...] = REGIONS,
    offset: dict[str, float] | None = None,
) -> pd.DataFrame:
    """A similarity table with random cosines (ties impossible in practice)."""
    rng = np.random.default_rng(seed)
    offset = offset or {}
    rows = []
    for cohort, n in sizes.items():
        for s in range(n):
            for li, layer in enumerate(layers):
                for pi, (a, b) in enumerate(combinations(regions, 2)):
                    value = 0.6 + 0.05 * li - 0.03 * pi + offset.get(cohort, 0.0)
                    rows.append(
                        {
                            "subject_id": f"{cohort}-{s:03d}",
                            "cohort": cohort,
                            "layer": layer,
                            "region_a": a,
                            "region_b": b,
                            "cosine": value + 0.1 * rng.normal(),
                        }
                    )
    return pd.DataFrame(rows)


def empty_features() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in schemas.FEATURES_COLUMNS})


def cosines(sim: pd.DataFrame, cohort: str, layer: str, pair: str) -> pd.Series:
    a, b = pair.split("-")
    rows = sim[
        (sim.cohort == cohort) & (sim.layer == layer) & (sim.region_a == a) & (sim.region_b == b)
    ]
    return rows.set_index("subject_id")["cosine"].sort_index()


def check_invariants(table: pd.DataFrame) -> None:
    """Columns fixed; NaN p only on skipped rows with a reason; p and q in [0, 1]."""
    assert list(table.columns) == list(schemas.TESTS_COLUMNS)
    skipped = table.status == "skipped"
    assert set(table.status) <= {"ok", "skipped"}
    assert (table.p_value.isna() == skipped).all()
    assert (table.loc[skipped, "reason"].str.len() > 0).all()
    ok = table[~skipped]
    assert ok.p_value.between(0, 1).all()
    assert ok.q_value.between(0, 1).all()
    assert (ok.q_value >= ok.p_value - 1e-12).all()  # p m / m may round down by an ulp
    assert ok.q_value_run.notna().all()


# --------------------------------------------------------------------------- cosine table


def test_cosine_table_matches_numpy() -> None:
    features = make_features({"a": 3, "b": 2}, seed=1)
    table = stats.cosine_table(features)
    assert list(table.columns) == list(schemas.SIMILARITY_COLUMNS)
    assert table.cosine.dtype == np.float64
    assert len(table) == 5 * len(LAYERS) * 3
    first = table[(table.subject_id == "a-000") & (table.layer == "conv-1")]
    assert list(zip(first.region_a, first.region_b, strict=True)) == [
        ("tibia", "femur"),
        ("tibia", "background"),
        ("femur", "background"),
    ]
    lookup = {
        (r.subject_id, r.layer, r.region): np.asarray(r.vector, dtype=np.float64)
        for r in features.itertuples()
    }
    for row in table.itertuples():
        u = lookup[(row.subject_id, row.layer, row.region_a)]
        v = lookup[(row.subject_id, row.layer, row.region_b)]
        expected = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        assert row.cosine == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_cosine_table_centre_subtracts_pooled_layer_mean() -> None:
    features = make_features({"a": 3, "b": 3}, seed=2)
    table = stats.cosine_table(features)
    # raw CNN-like vectors share a direction: raw cosines crowd near 1, centred do not
    assert table.cosine.min() > 0.8
    assert table.cosine_centred.abs().mean() < 0.5
    centred = table.assign(cosine=table.cosine_centred)
    layer = features[features.layer == "conv-3"]
    mean = np.stack([np.asarray(v, dtype=np.float64) for v in layer.vector]).mean(axis=0)
    u = np.asarray(layer[(layer.subject_id == "b-002") & (layer.region == "femur")].vector.iloc[0])
    v = np.asarray(
        layer[(layer.subject_id == "b-002") & (layer.region == "background")].vector.iloc[0]
    )
    u, v = u - mean, v - mean
    got = centred[
        (centred.subject_id == "b-002")
        & (centred.layer == "conv-3")
        & (centred.region_a == "femur")
    ].cosine.iloc[0]
    assert got == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=16))
def test_cosine_of_a_vector_with_itself_is_one(values: list[float]) -> None:
    vector = np.asarray(values, dtype=np.float32)
    features = pd.DataFrame(
        {
            "subject_id": ["s", "s"],
            "cohort": ["a", "a"],
            "region": ["tibia", "femur"],
            "layer": ["conv-1", "conv-1"],
            "layer_name": ["x", "x"],
            "channels": [vector.size] * 2,
            "voxels": [1, 1],
            "vector": [vector, vector.copy()],
        }
    )
    cosine = stats.cosine_table(features).cosine.iloc[0]
    if np.any(vector != 0):
        assert cosine == 1.0
    else:
        assert np.isnan(cosine)


def test_cosine_table_refuses_missing_columns_and_duplicates() -> None:
    features = make_features({"a": 2})
    with pytest.raises(stats.StatsInputError, match="vector"):
        stats.cosine_table(features.drop(columns="vector"))
    with pytest.raises(ValueError, match="repeating"):
        stats.cosine_table(pd.concat([features, features.iloc[:1]]))


# --------------------------------------------------------------------------- summaries


def test_summarise_matches_numpy() -> None:
    sim = make_similarity({"b": 12, "a": 9}, seed=3)
    sim.loc[5, "cosine"] = np.nan
    summary = stats.summarise(sim, CFG)
    assert list(summary.columns) == list(schemas.SUMMARY_COLUMNS)
    assert list(summary.cohort.unique()) == ["a", "b"]
    assert len(summary) == 2 * 3 * 3
    for row in summary.itertuples():
        x = cosines(sim, row.cohort, row.layer, row.pair).to_numpy()
        assert row.n_nan == int(np.isnan(x).sum())
        x = x[~np.isnan(x)]
        assert row.n == x.size
        assert row.mean == pytest.approx(x.mean(), rel=1e-12)
        assert row.sd == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert row.median == pytest.approx(np.median(x), rel=1e-12)
        assert row.ci_low < row.mean < row.ci_high


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_summary_ci_replays_its_resamples(level: float) -> None:
    """The summary CI is the percentile interval of the means of its own resamples:
    replayed here with the documented generator, one resample at a time."""
    sim = make_similarity({"a": 11}, seed=9)
    cfg = StatsConfig(bootstrap=300, seed=4, ci_level=level)
    summary = stats.summarise(sim, cfg)
    for row in summary.itertuples():
        x = cosines(sim, row.cohort, row.layer, row.pair).dropna().to_numpy()
        draws = stats.rng_for(4, f"summary|{row.cohort}|{row.layer}|{row.pair}")
        means = [x[i].mean() for i in draws.integers(0, x.size, size=(300, x.size))]
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(means, [tail, 100 - tail])
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), rel=1e-12)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_summary_ci_agrees_with_scipy_bootstrap(level: float) -> None:
    """Against scipy.stats.bootstrap (percentile method), both with 20,000 resamples:
    the endpoints agree to within 3 % of the interval's width (Monte Carlo error)."""
    sim = make_similarity({"a": 15}, seed=10, layers=("conv-1",))
    summary = stats.summarise(sim, StatsConfig(bootstrap=20000, seed=1, ci_level=level))
    for row in summary.itertuples():
        x = cosines(sim, row.cohort, row.layer, row.pair).dropna().to_numpy()
        ref = sps.bootstrap(
            (x,),
            np.mean,
            n_resamples=20000,
            confidence_level=level,
            method="percentile",
            rng=np.random.default_rng(2),
        ).confidence_interval
        width = ref.high - ref.low
        assert abs(row.ci_low - ref.low) < 0.03 * width
        assert abs(row.ci_high - ref.high) < 0.03 * width


def test_origin_table_shape_and_values() -> None:
    sim = make_similarity({"b": 4, "a": 5}, seed=4)
    table = stats.origin_table(sim)
    assert list(table.columns) == ["cohort", "pair", *LAYERS]
    assert list(table.pair[:3]) == ["tibia-femur", "tibia-background", "femur-background"]
    assert list(table.cohort) == ["a"] * 3 + ["b"] * 3
    for row in table.itertuples(index=False):
        for layer in LAYERS:
            expected = cosines(sim, row.cohort, layer, row.pair).mean()
            assert getattr(row, layer.replace("-", "_"), None) is None  # columns are "conv-1"
            got = table.loc[(table.cohort == row.cohort) & (table.pair == row.pair), layer]
            assert got.iloc[0] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- p-values vs scipy


@pytest.fixture(scope="module")
def three_cohorts() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    sim = make_similarity({"c": 9, "a": 11, "b": 10}, seed=5, offset={"b": 0.08})
    features = make_features({"c": 9, "a": 11, "b": 10}, seed=5, shift={"b": 1.0})
    return features, sim, stats.run_tests(features, sim, CFG)


def test_wilcoxon_p_values_equal_scipy(three_cohorts: tuple[pd.DataFrame, ...]) -> None:
    _, sim, table = three_cohorts
    rows = table[table.test == "wilcoxon"]
    assert len(rows) == 3 * 3 * 3
    for row in rows.itertuples():
        p1, p2 = row.pair.split("|")
        d = cosines(sim, row.cohort, row.layer, p1) - cosines(sim, row.cohort, row.layer, p2)
        expected = sps.wilcoxon(d.to_numpy(), zero_method="wilcox")
        assert row.p_value == pytest.approx(expected.pvalue, rel=1e-12)
        assert row.statistic == expected.statistic
        assert row.n == d.size
        assert row.ci_low <= row.effect_size <= row.ci_high


def test_friedman_p_values_equal_scipy(three_cohorts: tuple[pd.DataFrame, ...]) -> None:
    _, sim, table = three_cohorts
    rows = table[table.test == "friedman"]
    assert len(rows) == 3 * 3
    assert set(rows.layer) == {"conv-1|conv-3|conv-5"}
    for row in rows.itertuples():
        columns = [cosines(sim, row.cohort, layer, row.pair).to_numpy() for layer in LAYERS]
        expected = sps.friedmanchisquare(*columns)
        assert row.p_value == pytest.approx(expected.pvalue, rel=1e-12)
        n, k = columns[0].size, len(columns)
        # Kendall's W from its definition: 12 S / (n^2 (k^3 - k)), S the spread of rank sums
        ranks = np.apply_along_axis(sps.rankdata, 1, np.column_stack(columns))
        spread = ((ranks.sum(axis=0) - n * (k + 1) / 2) ** 2).sum()
        assert row.effect_size == pytest.approx(12 * spread / (n**2 * (k**3 - k)), rel=1e-12)


def test_between_p_values_equal_scipy(three_cohorts: tuple[pd.DataFrame, ...]) -> None:
    _, sim, table = three_cohorts
    mwu = table[table.test == "mannwhitneyu"]
    assert sorted(set(mwu.cohort)) == ["a|b", "a|c", "b|c"]
    for row in mwu.itertuples():
        c1, c2 = row.cohort.split("|")
        x, y = cosines(sim, c1, row.layer, row.pair), cosines(sim, c2, row.layer, row.pair)
        expected = sps.mannwhitneyu(x.to_numpy(), y.to_numpy(), alternative="two-sided")
        assert row.p_value == pytest.approx(expected.pvalue, rel=1e-12)
        wins = sum(float(xi > yj) + 0.5 * float(xi == yj) for xi in x for yj in y)
        assert row.effect_size == pytest.approx(2 * wins / (x.size * y.size) - 1, rel=1e-12)
    kw = table[table.test == "kruskal"]
    assert set(kw.cohort) == {"a|b|c"}
    assert len(kw) == 3 * 3
    for row in kw.itertuples():
        groups = [cosines(sim, c, row.layer, row.pair).to_numpy() for c in "abc"]
        expected = sps.kruskal(*groups)
        assert row.p_value == pytest.approx(expected.pvalue, rel=1e-12)
        assert row.effect_size == pytest.approx(expected.statistic / (30 - 1), rel=1e-12)


def test_q_values_equal_scipy(three_cohorts: tuple[pd.DataFrame, ...]) -> None:
    _, _, table = three_cohorts
    check_invariants(table)
    assert set(table.family) == set(stats.FAMILIES)
    for family in stats.FAMILIES:
        rows = table[(table.family == family) & (table.status == "ok")]
        expected = sps.false_discovery_control(rows.p_value.to_numpy(), method="bh")
        np.testing.assert_allclose(rows.q_value.to_numpy(), expected, rtol=1e-12)
    ok = table[table.status == "ok"]
    expected = sps.false_discovery_control(ok.p_value.to_numpy(), method="bh")
    np.testing.assert_allclose(ok.q_value_run.to_numpy(), expected, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40))
def test_bh_equals_scipy(p: list[float]) -> None:
    values = np.asarray(p)
    expected = sps.false_discovery_control(values, method="bh")
    np.testing.assert_allclose(stats.bh_qvalues(values), expected, rtol=1e-12, atol=1e-300)


def test_bh_ties_and_nan() -> None:
    q = stats.bh_qvalues([0.01, np.nan, 0.01, 0.04, 0.5])
    assert np.isnan(q[1])
    np.testing.assert_allclose(q[[0, 2, 3, 4]], [0.02, 0.02, 0.04 * 4 / 3, 0.5])


# --------------------------------------------------------------------------- effect sizes by hand


def test_rank_biserial_paired_by_hand() -> None:
    # |d| ranks 1..4; T+ = 1 + 2 + 4 = 7, T- = 3; r = (7 - 3) / 10
    assert stats.rank_biserial_paired([1.0, 2.0, -3.0, 4.0]) == pytest.approx(0.4)
    # zero dropped (wilcox), then ranks 1, 2: (1 - 2) / 3
    assert stats.rank_biserial_paired([0.0, 1.0, -2.0]) == pytest.approx(-1 / 3)
    # tie: ranks 1.5, 1.5, 3 -> T+ = 4.5, T- = 1.5 -> 3 / 6
    assert stats.rank_biserial_paired([1.0, -1.0, 2.0]) == pytest.approx(0.5)
    assert stats.rank_biserial_paired([0.5, 0.1, 0.2]) == 1.0


def test_rank_biserial_unpaired_and_epsilon_by_hand() -> None:
    rng = np.random.default_rng(0)
    below = stats.mann_whitney([1, 2, 3], [4, 5, 6], min_n=1, bootstrap=0, rng=rng)
    assert below.effect_size == -1.0
    assert below.statistic == 0.0
    even = stats.mann_whitney([1, 3], [2], min_n=1, bootstrap=0, rng=rng)
    assert even.effect_size == 0.0
    # ranks 1..6 in three groups: H = 12/(6*7) * (3^2 + 7^2 + 11^2)/2 - 21 = 32/7; eps2 = H/5
    kw = stats.kruskal_wallis([[1, 2], [3, 4], [5, 6]], min_n=1, bootstrap=0, rng=rng)
    assert kw.statistic == pytest.approx(32 / 7)
    assert kw.effect_size == pytest.approx(32 / 35)


def test_kendall_w_perfect_agreement_is_one() -> None:
    data = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4], [0.0, 0.7, 0.8], [0.5, 0.6, 0.95]])
    result = stats.friedman_depth(data, min_n=3, bootstrap=100, rng=np.random.default_rng(1))
    assert result.effect_size == pytest.approx(1.0)
    assert result.ci_low == pytest.approx(1.0)
    assert result.p_value == pytest.approx(sps.friedmanchisquare(*data.T).pvalue)


# --------------------------------------------------------------------------- permutation test


def loop_pseudo_f(vectors: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Anderson's pseudo-F and R², one pair of subjects at a time."""
    n = len(labels)
    groups = sorted(set(labels.tolist()))
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            u, v = vectors[i], vectors[j]
            dist[i, j] = 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    # 1 - cos is the squared distance (half the squared Euclidean distance of unit vectors)
    ss_t = sum(dist[i, j] for i in range(n) for j in range(i + 1, n)) / n
    ss_w = 0.0
    for g in groups:
        members = [i for i in range(n) if labels[i] == g]
        pairs = [(i, j) for i in members for j in members if i < j]
        ss_w += sum(dist[i, j] for i, j in pairs) / len(members)
    ss_a = ss_t - ss_w
    return (ss_a / (len(groups) - 1)) / (ss_w / (n - len(groups))), ss_a / ss_t


def loop_permanova_p(vectors: np.ndarray, labels: np.ndarray, perms: np.ndarray) -> float:
    observed, _ = loop_pseudo_f(vectors, labels)
    hits = 0
    for row in perms:
        f, _ = loop_pseudo_f(vectors, row)
        hits += f >= observed - 1e-10 * max(1.0, abs(observed))
    return (1 + hits) / (1 + len(perms))


def test_permanova_equals_centroid_form_and_is_never_negative() -> None:
    """With unit vectors u, 1 - cos = |u_i - u_j|^2 / 2, so SS_W and SS_T are half the
    within-group and total sums of squared deviations from the centroids."""
    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(12, 6)) + 1.5
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for seed in range(20):
        labels = np.random.default_rng(seed).permutation([0] * 6 + [1] * 6)
        ss_t = ((unit - unit.mean(axis=0)) ** 2).sum() / 2
        ss_w = sum(
            ((unit[labels == g] - unit[labels == g].mean(axis=0)) ** 2).sum() for g in (0, 1)
        )
        ss_w /= 2
        f_expected = ((ss_t - ss_w) / 1) / (ss_w / 10)
        result = stats.permanova(
            vectors, labels, min_n=3, permutations=9, rng=np.random.default_rng(seed)
        )
        assert result.statistic >= 0
        assert 0 <= result.effect_size <= 1
        assert result.statistic == pytest.approx(f_expected, rel=1e-9)
        assert result.effect_size == pytest.approx(1 - ss_w / ss_t, rel=1e-9)


def test_permanova_matches_loop_reimplementation() -> None:
    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(13, 5)) + 3.0
    vectors[7:, 1] += 0.8
    labels = np.array([0] * 7 + [1] * 6)
    result = stats.permanova(
        vectors, labels, min_n=3, permutations=99, rng=np.random.default_rng(5)
    )
    perms = np.random.default_rng(5).permuted(np.tile(labels, (99, 1)), axis=1)
    f, r2 = loop_pseudo_f(vectors, labels)
    assert result.statistic == pytest.approx(f, rel=1e-9)
    assert result.effect_size == pytest.approx(r2, rel=1e-9)
    assert result.p_value == loop_permanova_p(vectors, labels, perms)
    assert 0 < result.p_value < 1
    three = np.array([0] * 4 + [1] * 5 + [2] * 4)
    result3 = stats.permanova(
        vectors, three, min_n=3, permutations=49, rng=np.random.default_rng(6)
    )
    perms3 = np.random.default_rng(6).permuted(np.tile(three, (49, 1)), axis=1)
    assert result3.statistic == pytest.approx(loop_pseudo_f(vectors, three)[0], rel=1e-9)
    assert result3.p_value == loop_permanova_p(vectors, three, perms3)


def test_run_tests_permanova_row_matches_loop() -> None:
    features = make_features({"b": 5, "a": 6}, dim=4, seed=12, shift={"b": 0.7})
    sim = stats.cosine_table(features)
    cfg = StatsConfig(bootstrap=0, permutations=59, seed=3)
    table = stats.run_tests(features, sim, cfg)
    row = table[(table.test == "permanova") & (table.layer == "conv-3") & (table.pair == "femur")]
    assert len(row) == 1
    rows = features[(features.layer == "conv-3") & (features.region == "femur")]
    rows = rows.sort_values("subject_id")
    vectors = np.stack([np.asarray(v, dtype=np.float64) for v in rows.vector])
    labels = (rows.cohort == "b").to_numpy().astype(np.int64)
    # the documented seed: cfg.seed and a CRC-32 of family|cohorts|layer|pair|test
    rng = stats.rng_for(3, "between-features|a|b|conv-3|femur|permanova")
    perms = rng.permuted(np.tile(labels, (59, 1)), axis=1)
    assert row.cohort.iloc[0] == "a|b"
    assert row.statistic.iloc[0] == pytest.approx(loop_pseudo_f(vectors, labels)[0], rel=1e-9)
    assert row.p_value.iloc[0] == loop_permanova_p(vectors, labels, perms)


# --------------------------------------------------------------------------- calibration and power


def test_mann_whitney_calibrated_under_shuffled_labels() -> None:
    values = np.random.default_rng(21).normal(size=30)
    labels = np.array([0] * 15 + [1] * 15)
    shuffles = np.random.default_rng(22)
    rejections = 0
    trials = 2000
    for _ in range(trials):
        shuffled = shuffles.permutation(labels)
        result = stats.mann_whitney(
            values[shuffled == 0], values[shuffled == 1], min_n=3, bootstrap=0, rng=shuffles
        )
        rejections += result.p_value < 0.05
    assert 0.03 <= rejections / trials <= 0.07


def test_permanova_calibrated_under_shuffled_labels() -> None:
    vectors = np.random.default_rng(31).normal(size=(20, 6)) + 2.0
    labels = np.array([0] * 10 + [1] * 10)
    shuffles = np.random.default_rng(32)
    rejections = 0
    trials = 1000
    for _ in range(trials):
        result = stats.permanova(
            vectors, shuffles.permutation(labels), min_n=3, permutations=99, rng=shuffles
        )
        rejections += result.p_value <= 0.05
    assert 0.03 <= rejections / trials <= 0.07


def test_feature_permutation_test_finds_planted_shift() -> None:
    features = make_features({"a": 12, "b": 12}, dim=32, seed=41, shift={"b": 1.5})
    sim = stats.cosine_table(features)
    table = stats.run_tests(features, sim, CFG)
    rows = table[table.family == "between-features"]
    assert len(rows) == 9
    assert (rows.status == "ok").all()
    assert (rows.q_value < 0.05).all()
    assert (rows.effect_size > 0.05).all()
    # no shift, same design: nothing should come out
    null = make_features({"a": 12, "b": 12}, dim=32, seed=41)
    null_rows = stats.run_tests(null, stats.cosine_table(null), CFG)
    assert (null_rows[null_rows.family == "between-features"].q_value > 0.05).all()


# --------------------------------------------------------------------------- degenerate inputs


def test_all_equal_values_skip_with_reason() -> None:
    sim = make_similarity({"a": 5, "b": 5})
    sim["cosine"] = 0.5
    features = make_features({"a": 5, "b": 5})
    features["vector"] = [np.ones(8, dtype=np.float32)] * len(features)
    table = stats.run_tests(features, sim, CFG)
    check_invariants(table)
    assert (table.status == "skipped").all()
    reasons = table.groupby("test").reason.first()
    assert reasons["wilcoxon"] == "all differences are zero"
    assert "equal values at all layers" in reasons["friedman"]
    assert reasons["mannwhitneyu"] == "all values are equal"
    assert "same way" in reasons["permanova"]
    assert set(stats.sanity_flags(features, sim).flag) >= {"identical-layers"}


def test_n_of_one_is_skipped_below_min_n() -> None:
    features = make_features({"a": 1, "b": 1})
    sim = stats.cosine_table(features)
    table = stats.run_tests(features, sim, CFG)
    check_invariants(table)
    assert (table.status == "skipped").all()
    assert table.flag.str.contains("below-min-n").all()
    assert table.reason.str.contains("below min_n=3").all()
    assert (table.n[table.family != "between-pairs"] <= 2).all()
    # min_n = 1 lets the rank tests run and still never gives a silent NaN
    loose = stats.run_tests(features, sim, StatsConfig(min_n=1, bootstrap=50, permutations=9))
    check_invariants(loose)
    permanova = loose[loose.test == "permanova"]
    assert permanova.reason.str.contains("degrees of freedom").all()


def test_one_cohort_skips_between_tests() -> None:
    features = make_features({"only": 6})
    sim = stats.cosine_table(features)
    table = stats.run_tests(features, sim, CFG)
    check_invariants(table)
    between = table[table.family.str.startswith("between")]
    assert len(between) == 9 + 9
    assert (between.status == "skipped").all()
    assert (between.reason == "one cohort").all()
    assert (table[table.family.str.startswith("within")].status == "ok").all()


def test_nan_cosine_drops_that_subject() -> None:
    sim = make_similarity({"a": 8, "b": 8}, seed=6)
    hit = (sim.subject_id == "a-002") & (sim.layer == "conv-1") & (sim.region_b == "femur")
    sim.loc[hit, "cosine"] = np.nan
    table = stats.run_tests(empty_features(), sim, CFG)
    check_invariants(table)
    row = table[
        (table.test == "wilcoxon")
        & (table.cohort == "a")
        & (table.layer == "conv-1")
        & (table.pair == "tibia-femur|tibia-background")
    ].iloc[0]
    assert row.status == "ok"
    assert row.n == 7
    assert "dropped 1 subject" in row.reason
    assert "nan-cosine" in row.flag
    d = cosines(sim, "a", "conv-1", "tibia-femur") - cosines(sim, "a", "conv-1", "tibia-background")
    assert row.p_value == pytest.approx(sps.wilcoxon(d.dropna().to_numpy()).pvalue, rel=1e-12)
    depth = table[
        (table.test == "friedman") & (table.cohort == "a") & (table.pair == "tibia-femur")
    ]
    assert depth.n.iloc[0] == 7


def test_zero_norm_vector_gives_nan_and_flag() -> None:
    features = make_features({"a": 6, "b": 6}, seed=7)
    hit = (features.subject_id == "b-001") & (features.layer == "conv-5")
    hit &= features.region == "tibia"
    features.loc[hit, "vector"] = pd.Series(
        [np.zeros(8, dtype=np.float32)], index=features.index[hit]
    )
    sim = stats.cosine_table(features)
    bad = sim[(sim.subject_id == "b-001") & (sim.layer == "conv-5")]
    assert bad.cosine.isna().sum() == 2  # tibia-femur, tibia-background
    flags = stats.sanity_flags(features, sim)
    zero = flags[flags.flag == "zero-norm"]
    assert list(zip(zero.subject_id, zero.layer, zero.region, strict=True)) == [
        ("b-001", "conv-5", "tibia")
    ]
    assert (flags.flag == "nan-cosine").sum() == 2
    table = stats.run_tests(features, sim, CFG)
    check_invariants(table)
    row = table[(table.test == "permanova") & (table.layer == "conv-5") & (table.pair == "tibia")]
    assert row.status.iloc[0] == "ok"
    assert row.n.iloc[0] == 11
    assert "zero-norm" in row.flag.iloc[0]
    assert "dropped 1 subject" in row.reason.iloc[0]
    clean = table[(table.test == "permanova") & (table.layer == "conv-1")]
    assert (clean.flag == "").all()


def test_exact_one_cosine_and_identical_layers_are_flagged() -> None:
    features = make_features({"a": 5, "b": 5}, seed=8)
    femur = (features.subject_id == "a-003") & (features.layer == "conv-1")
    tibia = femur & (features.region == "tibia")
    femur &= features.region == "femur"
    features.loc[femur, "vector"] = features.loc[tibia, "vector"].to_numpy()
    same = (features.subject_id == "b-000") & (features.region == "background")
    source = features.loc[same & (features.layer == "conv-1"), "vector"].iloc[0]
    features.loc[same & (features.layer == "conv-3"), "vector"] = pd.Series(
        [source.copy()], index=features.index[same & (features.layer == "conv-3")]
    )
    sim = stats.cosine_table(features)
    flags = stats.sanity_flags(features, sim)
    one = flags[flags.flag == "cosine-one"]
    assert list(zip(one.subject_id, one.layer, one.region, strict=True)) == [
        ("a-003", "conv-1", "tibia-femur")
    ]
    twin = flags[flags.flag == "identical-layers"]
    assert list(zip(twin.subject_id, twin.layer, twin.region, strict=True)) == [
        ("b-000", "conv-1|conv-3", "background")
    ]
    table = stats.run_tests(features, sim, CFG)
    check_invariants(table)
    flagged = table[table.flag.str.contains("cosine-one")]
    # exactly the tests whose data hold a-003's tibia-femur cosine at conv-1
    rows = zip(flagged.family, flagged.cohort, flagged.layer, flagged.pair, strict=True)
    assert sorted(rows) == [
        ("between-pairs", "a|b", "conv-1", "tibia-femur"),
        ("within-depth", "a", "conv-1|conv-3|conv-5", "tibia-femur"),
        ("within-pairs", "a", "conv-1", "tibia-femur|femur-background"),
        ("within-pairs", "a", "conv-1", "tibia-femur|tibia-background"),
    ]
    depth = table[(table.test == "friedman") & (table.cohort == "b")]
    assert depth.flag[depth.pair.str.contains("background")].str.contains("identical-layers").all()
    assert (depth.flag[depth.pair == "tibia-femur"] == "").all()


def test_two_layers_skip_friedman_and_empty_tables() -> None:
    sim = make_similarity({"a": 6, "b": 6}, layers=("conv-1", "conv-3"))
    table = stats.run_tests(empty_features(), sim, CFG)
    check_invariants(table)
    depth = table[table.test == "friedman"]
    assert (depth.status == "skipped").all()
    assert depth.reason.str.contains("needs >= 3 layers, found 2").all()
    empty = stats.run_tests(empty_features(), sim.iloc[:0], CFG)
    assert list(empty.columns) == list(schemas.TESTS_COLUMNS)
    assert empty.empty
    assert stats.summarise(sim.iloc[:0], CFG).empty
    assert stats.cosine_table(empty_features()).empty


def test_wilcoxon_zero_differences_are_dropped_as_documented() -> None:
    y = np.linspace(0.2, 0.65, 10)
    d = np.array([0, 0, 0.3, -0.1, 0.2, 0.4, -0.05, 0.6, 0.7, 0.15])
    result = stats.wilcoxon_pairs(y + d, y, min_n=3, bootstrap=0, rng=np.random.default_rng(0))
    expected = sps.wilcoxon(y + d - y, zero_method="wilcox")
    # "pratt" would give 0.0547 here, "wilcox" 0.0391
    assert result.p_value == pytest.approx(expected.pvalue, rel=1e-12)
    assert result.p_value < 0.045
    assert result.statistic == expected.statistic
    assert "2 zero difference" in result.reason
    assert result.n == 10
    # effect on the 8 non-zero differences: negatives rank 2 and 1 of 8 -> (33 - 3) / 36
    assert result.effect_size == pytest.approx(30 / 36)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        StatsConfig(ci_level=1.0)
    with pytest.raises(ConfigError):
        StatsConfig(seed=-1)
    with pytest.raises(ConfigError):
        StatsConfig(min_n=0)


# --------------------------------------------------------------------------- determinism


def test_run_tests_is_deterministic_and_order_free() -> None:
    features = make_features({"b": 6, "a": 7, "c": 5}, seed=9, shift={"c": 0.5})
    sim = stats.cosine_table(features)
    first = stats.run_tests(features, sim, CFG)
    second = stats.run_tests(features, sim, CFG)
    pd.testing.assert_frame_equal(first, second)
    assert first.to_csv(index=False) == second.to_csv(index=False)
    # subjects arriving in another order (layers and regions keep theirs) change nothing
    subjects = sorted(features.subject_id.unique(), reverse=True)
    shuffled_f = pd.concat([features[features.subject_id == s] for s in subjects])
    shuffled_s = pd.concat([sim[sim.subject_id == s] for s in subjects])
    pd.testing.assert_frame_equal(first, stats.run_tests(shuffled_f, shuffled_s, CFG))
    summary = stats.summarise(sim, CFG)
    pd.testing.assert_frame_equal(summary, stats.summarise(shuffled_s, CFG))


def test_adding_a_cohort_leaves_other_tests_unchanged() -> None:
    sim = make_similarity({"a": 8, "b": 8}, seed=10)
    more = pd.concat([sim, make_similarity({"c": 8}, seed=11)], ignore_index=True)
    two = stats.run_tests(empty_features(), sim, CFG)
    three = stats.run_tests(empty_features(), more, CFG)
    keys = ["family", "cohort", "layer", "pair", "test"]
    merged = two.merge(three, on=keys, suffixes=("", "_3"))
    assert len(merged) == len(two)
    for column in ("p_value", "effect_size", "ci_low", "ci_high"):
        np.testing.assert_array_equal(merged[column], merged[f"{column}_3"])


def test_full_size_cohort_is_tested_whole() -> None:
    """200 subjects x 3 regions x 3 layers, 32..1024 channels, default cfg (999 permutations):
    every test runs. How long it takes is bench/stats_scale.py's concern, not a timed test's
    (a wall-clock bound fails on a busy machine)."""
    features = make_features({"a": 100, "b": 100}, dim=32, seed=13)
    widths = {"conv-1": 1024, "conv-3": 256, "conv-5": 32}
    rng = np.random.default_rng(14)
    features["vector"] = [
        (2.0 + np.abs(rng.normal(size=widths[layer]))).astype(np.float32)
        for layer in features.layer
    ]
    features["channels"] = features.layer.map(widths)
    sim = stats.cosine_table(features)
    table = stats.run_tests(features, sim, StatsConfig())
    check_invariants(table)
    assert (table.status == "ok").all()
