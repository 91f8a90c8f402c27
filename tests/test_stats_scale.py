"""The reducer at scale (issue 16): same numbers as the whole-matrix forms, linear memory.

References live here, not in the package: PERMANOVA's pseudo-F from the N x N
cosine-distance matrix (the form the package used before), and the
documented random draws made in one call. Each check can fail: the package
computes its statistics another way (group sums, running counts, blocks of
resamples) and must land on the same values.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cohort import stats
from cohort.config import StatsConfig
from cohort.execution.reduce import read_features
from cohort.stats import bootstrap
from cohort.stats.common import Result
from cohort.synthetic import synthetic_results

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
# the module (cohort.stats.permanova is also the name of its function)
permanova = importlib.import_module("cohort.stats.permanova")


# ------------------------------------------------------------ PERMANOVA references


def matrix_pseudo_f(
    vectors: np.ndarray, labels: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Anderson's pseudo-F and R² for each row of ``labels`` from the distance matrix.

    SS_T = (1/N) sum_{i<j} d_ij, SS_W = sum_g (1/n_g) sum_{i<j in g} d_ij with
    d = 1 - cos (bit-identical rows 0), within sums as o_g' D o_g / 2.
    """
    dist = stats.cosine_distances(vectors)
    n, g = dist.shape[0], sizes.size
    ss_total = dist.sum() / (2.0 * n)
    onehot = np.eye(g)[labels]  # P x N x g
    within_pairs = np.einsum("png,png->pg", onehot, np.matmul(dist, onehot)) / 2.0
    ss_within = (within_pairs / sizes).sum(axis=1)
    ss_among = ss_total - ss_within
    among_ms, within_ms = ss_among / (g - 1), ss_within / (n - g)
    f = np.full(labels.shape[0], np.inf)
    np.divide(among_ms, within_ms, out=f, where=within_ms > 0)
    f[(within_ms <= 0) & (among_ms <= 0)] = 0.0
    return f, ss_among / ss_total


def matrix_permanova(
    vectors: np.ndarray, labels: np.ndarray, permutations: int, seed: int
) -> tuple[float, float, float]:
    """(F, R², p) with the documented draws, all in one P x N call."""
    sizes = np.bincount(labels)
    f_obs, r2 = matrix_pseudo_f(vectors, labels[None, :], sizes)
    perms = np.random.default_rng(seed).permuted(np.tile(labels, (permutations, 1)), axis=1)
    f_perm, _ = matrix_pseudo_f(vectors, perms, sizes)
    observed = f_obs[0]
    threshold = observed - 1e-10 * max(1.0, abs(observed)) if np.isfinite(observed) else observed
    return (
        float(f_obs[0]),
        float(r2[0]),
        (1 + int((f_perm >= threshold).sum())) / (1 + permutations),
    )


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-4 groups of unequal sizes; positive vectors (cosines near 1, as CNN features)
    with a group shift of random strength, so p ranges from small to large."""
    rng = np.random.default_rng(seed)
    groups = int(rng.integers(2, 5))
    sizes = rng.integers(3, 25, groups)
    labels = rng.permutation(np.repeat(np.arange(groups), sizes))
    channels = int(rng.integers(2, 40))
    vectors = rng.gamma(2.0, 1.0, (labels.size, channels)) + rng.uniform(0.0, 3.0)
    vectors += rng.uniform(0.0, 0.8) * rng.normal(size=(groups, channels))[labels]
    return vectors, labels


@pytest.mark.parametrize("seed", range(40))
def test_permanova_centroid_form_equals_distance_matrix_form(seed: int) -> None:
    vectors, labels = random_case(seed)
    permutations = int(np.random.default_rng(seed + 100).integers(50, 300))
    result = stats.permanova(
        vectors, labels, min_n=3, permutations=permutations, rng=np.random.default_rng(seed)
    )
    f, r2, p = matrix_permanova(vectors, labels, permutations, seed)
    assert result.status == "ok"
    assert result.statistic == pytest.approx(f, rel=1e-10, abs=0)
    assert result.effect_size == pytest.approx(r2, rel=1e-10, abs=0)
    assert result.p_value == p  # the same permutations, counted the same way


def test_permanova_pseudo_f_of_every_permutation_equals_the_matrix_form() -> None:
    """Not only the p-value: F and R² of each permuted labelling, 2 to 4 groups."""
    for seed in range(6):
        vectors, labels = random_case(seed)
        sizes = np.bincount(labels)
        perms = np.random.default_rng(seed).permuted(np.tile(labels, (200, 1)), axis=1)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        f, r2 = permanova.pseudo_f(unit - unit.mean(axis=0), perms, sizes)
        f_ref, r2_ref = matrix_pseudo_f(vectors, perms, sizes)
        np.testing.assert_allclose(f, f_ref, rtol=1e-10, atol=0)
        np.testing.assert_allclose(r2, r2_ref, rtol=1e-10, atol=0)


def test_permanova_ties_with_the_observed_f_count_as_in_the_matrix_form() -> None:
    """Two equal groups: every permutation that swaps them whole reproduces F_obs up to
    rounding, and must be counted (tolerance 1e-10), as in the matrix form."""
    # two well-separated directions; with these values the swapped labelling's F comes
    # out a rounding below F_obs (on this machine's BLAS), so the tolerance matters
    vectors = np.random.default_rng(0).uniform(0.0, 0.2, (6, 5))
    vectors[:3, 0] += 1.0
    vectors[3:, 1] += 1.0
    labels = np.array([0, 0, 0, 1, 1, 1])
    # 20 partitions into two triples, 2 labellings each reproduce the observed one
    result = stats.permanova(
        vectors, labels, min_n=3, permutations=400, rng=np.random.default_rng(1)
    )
    perms = np.random.default_rng(1).permuted(np.tile(labels, (400, 1)), axis=1)
    same = int(((perms == labels).all(axis=1) | (perms != labels).all(axis=1)).sum())
    assert same > 0
    assert result.p_value == matrix_permanova(vectors, labels, 400, 1)[2]
    assert result.p_value == (1 + same) / 401  # the observed split is the most separated


def test_permanova_groups_of_identical_vectors_give_infinite_f() -> None:
    """Internally identical groups: SS_W is 0 in the matrix form (twins at distance 0),
    rounding in the centroid form; both give F = inf and count the same ties."""
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 0.5])
    vectors = np.array([a] * 4 + [b] * 5)
    labels = np.array([0] * 4 + [1] * 5)
    result = stats.permanova(
        vectors, labels, min_n=3, permutations=99, rng=np.random.default_rng(2)
    )
    f, r2, p = matrix_permanova(vectors, labels, 99, 2)
    assert result.statistic == f == np.inf
    assert result.effect_size == pytest.approx(r2, rel=1e-12)
    assert result.p_value == p


def nudged(base: np.ndarray, distance: float, towards: np.ndarray) -> np.ndarray:
    """``base`` turned towards ``towards`` (orthogonal to it) to cosine distance ``distance``."""
    unit = base / np.linalg.norm(base)
    across = towards / np.linalg.norm(towards)
    angle = np.arccos(1.0 - distance)
    return np.cos(angle) * unit + np.sin(angle) * across


@pytest.mark.parametrize("spread", [False, True])
def test_permanova_same_direction_skip_is_decided_as_by_the_matrix(spread: bool) -> None:
    """All vectors within 1e-12 cosine distance of each other: skipped. The package
    bounds the largest distance by 4 x the largest to a reference row (the first, then
    the farthest from it) and checks the pairs only in the band where that cannot
    decide; the matrix decides. Here both cases sit in the band: the farthest pair
    (B, C, 1.16e-12 apart when spread) is seen from neither reference."""
    base = np.array([1.0, 2.0, 3.0])
    x = np.array([2.0, -1.0, 0.0])
    y = np.cross(base, x)
    side = 2.9e-13 if spread else 2e-13
    vectors = np.array(
        [
            base,
            2.0 * base,
            3.0 * nudged(base, 3e-13, x),  # A: the farthest from the first row
            4.0 * nudged(base, side, y),  # B and C on opposite sides, across A
            5.0 * nudged(base, side, -y),
            6.0 * base,
        ]
    )
    labels = np.array([0, 0, 0, 1, 1, 1])
    dist = stats.cosine_distances(vectors)
    assert dist[0].max() <= 1e-12 < 4 * dist[0].max()  # no decision from the first row
    assert dist[2].max() <= 1e-12 < 4 * dist[2].max()  # nor from the one farthest from it
    assert (dist.max() > 1e-12) == spread
    result = stats.permanova(vectors, labels, min_n=3, permutations=9, rng=np.random.default_rng(0))
    assert result.status == ("ok" if spread else "skipped")
    if not spread:
        assert "same way" in result.reason


# ------------------------------------------------------------ draws in blocks


def test_blocks_of_draws_hold_the_values_of_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the blocked statistics rely on: numpy draws integers and permutations
    value by value, so blocks drawn in sequence equal the one documented call."""
    monkeypatch.setattr(bootstrap, "BLOCK_VALUES", 50)
    for n in (1, 7, 13, 40):
        whole = np.random.default_rng(5).integers(0, n, size=(101, n))
        rng = np.random.default_rng(5)
        parts = [
            rng.integers(0, n, size=(stop - start, n)) for start, stop in bootstrap.blocks(101, n)
        ]
        assert len(parts) > 1
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    counts = [
        bootstrap.counts_in_rows(rng.integers(0, 13, size=(stop - start, 13)), 13)
        for rng in [np.random.default_rng(6)]
        for start, stop in bootstrap.blocks(101, 13)
    ]
    whole_counts = bootstrap.resample_counts(np.random.default_rng(6), 13, 101)
    np.testing.assert_array_equal(np.concatenate(counts), whole_counts)
    assert (whole_counts.sum(axis=1) == 13).all()
    labels = np.array([0] * 5 + [1] * 7 + [2] * 4, dtype=np.int64)
    whole = np.random.default_rng(3).permuted(np.tile(labels, (99, 1)), axis=1)
    rng = np.random.default_rng(3)
    parts = [rng.permuted(np.tile(labels.astype(np.int8), (k, 1)), axis=1) for k in (1, 40, 58)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_group_streams_start_where_each_group_is_drawn() -> None:
    sizes, draws = (5, 9, 4), 33
    rng = np.random.default_rng(8)
    whole = [rng.integers(0, n, size=(draws, n)) for n in sizes]
    after = rng.integers(0, 1000, 5)
    rng = np.random.default_rng(8)
    streams = bootstrap.group_streams(rng, sizes, draws)
    for stream, n, expected in zip(streams, sizes, whole, strict=True):
        np.testing.assert_array_equal(stream.integers(0, n, size=(draws, n)), expected)
    np.testing.assert_array_equal(rng.integers(0, 1000, 5), after)  # rng ends as before


def tied(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    return np.round(2.0 * rng.normal(shift, 1.0, n)) / 2.0


def rank_tests(values: Callable[[np.random.Generator, int, float], np.ndarray]) -> list[Result]:
    data = np.random.default_rng(11)
    x, y, z = values(data, 23, 0.4), values(data, 31, 0.0), values(data, 17, -0.3)
    vectors = np.abs(np.stack([x, y[:23], values(data, 23, 0.2)], axis=1)) + 0.1
    kw = {"min_n": 3, "bootstrap": 150, "level": 0.9}
    results = [
        stats.mann_whitney(x, y, rng=np.random.default_rng(1), **kw),
        stats.kruskal_wallis([x, y, z], rng=np.random.default_rng(2), **kw),
        stats.wilcoxon_pairs(x, y[:23], rng=np.random.default_rng(3), **kw),
        stats.friedman_depth(
            np.stack([x[:17], y[:17], z], axis=1), rng=np.random.default_rng(4), **kw
        ),
        stats.permanova(
            vectors,
            np.repeat([0, 1, 2], [8, 7, 8]),
            min_n=3,
            permutations=150,
            rng=np.random.default_rng(5),
        ),
    ]
    return results


@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_results_do_not_depend_on_the_block_size(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One resample (and 2 permutations) per block against the default blocks: the
    rank tests bit-identical, with ties (general path) and without (fast path);
    PERMANOVA's p the same, its F and R² to rounding (matrix products of another
    shape)."""
    values = tied if kind == "ties" else (lambda rng, n, shift: rng.normal(shift, 1.0, n))
    default = rank_tests(values)
    monkeypatch.setattr(bootstrap, "BLOCK_VALUES", 1)
    monkeypatch.setattr(permanova, "BLOCK_VALUES", 1)
    monkeypatch.setattr(permanova, "_MIN_ROWS", 2)
    blocked = rank_tests(values)
    exact = [repr(dataclasses.astuple(r)) for r in blocked[:4]]  # repr: exact, nan == nan
    assert exact == [repr(dataclasses.astuple(r)) for r in default[:4]]
    assert blocked[4].p_value == default[4].p_value
    assert blocked[4].statistic == pytest.approx(default[4].statistic, rel=1e-12)
    assert blocked[4].effect_size == pytest.approx(default[4].effect_size, rel=1e-12)


# ------------------------------------------------------------ memory


BYTES_PER_SUBJECT = 2000  # today's (before issue 16) Mann-Whitney bootstrap: 80,000 at N = 20,000


def traced_peak(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_bootstraps_and_permanova_need_memory_linear_in_n() -> None:
    """N = 20,000 subjects (10,000 per cohort), 2,000 resamples, 32 channels: every test's
    peak of traced allocations (numpy's included) stays under 2,000 bytes per subject.
    The pairwise and whole-matrix forms failed this: the Mann-Whitney wins matrix and
    B x n count matrices took 1.6 GB (80,000 bytes per subject), PERMANOVA's N x N
    distances 3.2 GB for one copy."""
    n = 20_000
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.1, 1.0, n // 2), rng.normal(0.0, 1.0, n // 2)
    vectors = rng.gamma(2.0, 1.0, (n, 32))
    labels = np.repeat([0, 1], n // 2)
    kw = {"min_n": 3, "bootstrap": 2000}
    calls: dict[str, Callable[[], object]] = {
        "mann-whitney": lambda: stats.mann_whitney(x, y, rng=np.random.default_rng(1), **kw),
        "kruskal-wallis": lambda: stats.kruskal_wallis(
            [x, y[: n // 4], y[n // 4 :]], rng=np.random.default_rng(1), **kw
        ),
        "wilcoxon": lambda: stats.wilcoxon_pairs(x, y, rng=np.random.default_rng(1), **kw),
        "friedman": lambda: stats.friedman_depth(
            np.stack([x, y, x + y], axis=1), rng=np.random.default_rng(1), **kw
        ),
        "permanova": lambda: stats.permanova(
            vectors, labels, min_n=3, permutations=199, rng=np.random.default_rng(1)
        ),
    }
    peaks = {name: traced_peak(call) for name, call in calls.items()}
    assert all(peak < BYTES_PER_SUBJECT * n for peak in peaks.values()), {
        name: f"{peak / n:.0f} B/subject" for name, peak in peaks.items()
    }


def test_summaries_bootstrap_memory_is_linear_in_n() -> None:
    n = 20_000
    similarity = pd.DataFrame(
        {
            "subject_id": [f"s{i:05d}" for i in range(n)],
            "cohort": "a",
            "layer": "conv-1",
            "region_a": "tibia",
            "region_b": "femur",
            "cosine": np.random.default_rng(0).uniform(0.5, 1.0, n),
        }
    )
    peak = traced_peak(lambda: stats.summarise(similarity, StatsConfig(bootstrap=2000)))
    assert peak < BYTES_PER_SUBJECT * n, f"{peak / n:.0f} B/subject"


# ------------------------------------------------------------ the reducer's tables


def test_arrow_vectors_give_the_tables_of_per_row_arrays(tmp_path: Path) -> None:
    """features.parquet read with its vectors kept in Arrow (one flat buffer) gives the
    cosine table, flags and tests of the per-row numpy arrays pandas makes by default."""
    folder = synthetic_results(
        tmp_path / "run",
        n_per_cohort=7,
        identical=2,
        images=False,
        cfg=StatsConfig(bootstrap=50, permutations=19),
    )
    arrow = read_features(folder / "features.parquet")
    plain = pq.read_table(folder / "features.parquet").to_pandas()
    assert isinstance(arrow["vector"].dtype, pd.ArrowDtype)
    assert isinstance(plain["vector"].iloc[0], np.ndarray)
    sim = stats.cosine_table(plain)
    pd.testing.assert_frame_equal(stats.cosine_table(arrow), sim)
    pd.testing.assert_frame_equal(stats.sanity_flags(arrow, sim), stats.sanity_flags(plain, sim))
    assert (stats.sanity_flags(arrow, sim).flag == "cosine-one").sum() == 2 * 3
    cfg = StatsConfig(bootstrap=50, permutations=19, centre=True)
    pd.testing.assert_frame_equal(
        stats.run_tests(arrow, sim, cfg), stats.run_tests(plain, sim, cfg)
    )
    stored = pq.read_table(folder / "similarity.parquet").to_pandas()
    pd.testing.assert_frame_equal(stored, sim, check_dtype=False)


def test_identical_layers_are_found_per_subject_and_region() -> None:
    """The flag names the earliest layer with the same bytes, for exactly the planted
    subject-region pairs; -0.0 and 0.0 differ in bytes, as in a byte digest."""
    rng = np.random.default_rng(4)
    rows = []
    for s in range(6):
        for layer in ("l1", "l2", "l3"):
            for region in ("r1", "r2"):
                rows.append(
                    {
                        "subject_id": f"s{s}",
                        "cohort": "a" if s < 3 else "b",
                        "region": region,
                        "layer": layer,
                        "layer_name": layer,
                        "channels": 3,
                        "voxels": 1,
                        "vector": rng.uniform(0.1, 1.0, 3).astype(np.float32),
                    }
                )
    features = pd.DataFrame(rows)

    def vector(s: int, layer: str, region: str) -> np.ndarray:
        row = (
            (features.subject_id == f"s{s}")
            & (features.layer == layer)
            & (features.region == region)
        )
        return features.loc[row, "vector"].iloc[0]

    def plant(s: int, layer: str, region: str, value: np.ndarray) -> None:
        row = (
            (features.subject_id == f"s{s}")
            & (features.layer == layer)
            & (features.region == region)
        )
        features.loc[row, "vector"] = pd.Series([value.copy()], index=features.index[row])

    plant(1, "l3", "r2", vector(1, "l1", "r2"))  # l1 = l3
    plant(4, "l2", "r1", vector(4, "l1", "r1"))  # l1 = l2 = l3: both name l1
    plant(4, "l3", "r1", vector(4, "l1", "r1"))
    plant(5, "l3", "r1", vector(5, "l2", "r1"))  # l2 = l3
    zero = np.zeros(3, dtype=np.float32)
    plant(2, "l1", "r1", zero)
    plant(2, "l2", "r1", -zero)  # all zero: left out, never "identical"
    flags = stats.sanity_flags(features, stats.cosine_table(features))
    found = flags[flags.flag == "identical-layers"][["subject_id", "layer", "region"]]
    assert sorted(map(tuple, found.to_numpy().tolist())) == [
        ("s1", "l1|l3", "r2"),
        ("s4", "l1|l2", "r1"),
        ("s4", "l1|l3", "r1"),
        ("s5", "l2|l3", "r1"),
    ]


def test_synthetic_results_content(tmp_path: Path) -> None:
    """The vectorised generator: row order, ids, manifest rows, identical femur vectors."""
    folder = synthetic_results(
        tmp_path / "run",
        n_per_cohort=4,
        failed=1,
        identical=2,
        images=False,
        cfg=StatsConfig(bootstrap=0, permutations=0),
    )
    features = read_features(folder / "features.parquet")
    assert len(features) == 2 * 4 * 3 * 3
    first = features.iloc[:9]
    assert set(first.subject_id) == {"control-001"}
    assert list(first.layer) == ["conv-1"] * 3 + ["conv-3"] * 3 + ["conv-5"] * 3
    assert list(first.region[:3]) == ["tibia", "femur", "background"]
    assert (features.channels == 32).all()
    matrix = np.stack(features.vector.map(np.asarray).to_numpy())
    assert matrix.shape == (72, 32) and (matrix >= 0).all()
    tibia, femur = matrix[0::3], matrix[1::3]
    same = (tibia == femur).all(axis=1)
    assert same.sum() == 2 * 3 and same[:6].all()  # the first 2 subjects, every layer
    manifest = pd.read_csv(folder / "manifest.csv")
    assert list(manifest.subject_id) == [
        *[f"control-00{i}" for i in range(1, 5)],
        "control-F01",
        *[f"osteo-00{i}" for i in range(1, 5)],
        "osteo-F01",
    ]


# ------------------------------------------------------------ the bench harness


def test_stats_scale_bench_runs_and_reports(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.stats_scale", "--subjects", "30", "--keep", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    row = out.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "30" and cells[4] == "ok"
    assert float(cells[1]) > 0 and 0.05 < float(cells[2]) < 3.0  # seconds, GB
    run = json.loads((tmp_path / "stats-30" / "run.json").read_text())
    assert run["config"]["stats"] == dataclasses.asdict(StatsConfig())  # the defaults
    tests = pq.read_table(tmp_path / "stats-30" / "stats.parquet").to_pandas()
    assert (tests.status == "ok").all()
