"""Similarity tables, cohort tests, effect sizes and FDR: the reducer's core.

Pure functions, tables in and tables out. The inputs are the pipeline's two
Parquet tables read into pandas:

- ``features``: subject_id, cohort, region, layer, layer_name, channels,
  voxels, vector (one float32 vector of length ``channels`` per row);
- ``similarity``: subject_id, cohort, layer, region_a, region_b, cosine.

Public API
----------
:func:`cosine_table`   features -> similarity (optionally centred)
:func:`summarise`      similarity -> n, mean, sd, median, bootstrap CI per cohort x layer x pair
:func:`origin_table`   similarity -> the origin study's table shape (what similarity.csv holds)
:func:`sanity_flags`   features + similarity -> one row per suspicious value
:func:`run_tests`      features + similarity -> one row per test, with BH q-values
:func:`bh_qvalues`     Benjamini-Hochberg adjusted p-values

The single tests (:func:`wilcoxon_pairs`, :func:`friedman_depth`,
:func:`mann_whitney`, :func:`kruskal_wallis`, :func:`permanova`) take plain
arrays and return a :class:`Result`; :func:`run_tests` only arranges the data
and calls them.

Conventions
-----------
- Orders: regions, region pairs and layers keep their order of first
  appearance in the input (``conv-1, conv-3, conv-5``; ``tibia-femur`` before
  ``tibia-background``); cohorts are sorted by name; inside a test subjects are
  sorted by id, so a test does not depend on the order rows arrived in.
- Randomness: each bootstrap or permutation draws from its own
  ``numpy.random.default_rng([cfg.seed, zlib.crc32(key)])`` where ``key``
  names the test (family, cohorts, layer, pair, test), so adding or removing a
  test never changes the draws of another.
- Confidence intervals (``ci_low``, ``ci_high``) are seeded percentile
  bootstrap intervals of the row's *effect size* (not of a location shift),
  at ``cfg.ci_level``, resampling subjects (within each cohort for between
  tests; stratified). Resamples where the effect is undefined are left out.
  The feature-level permutation test has no CI (NaN): resampling subjects
  with replacement puts zero distances between copies, which inflates R².
- A p-value is NaN only on a row with ``status == "skipped"``, and then
  ``reason`` says why.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats as sps

from cohort.config import StatsConfig
from cohort.errors import CohortError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURE_COLUMNS: Final = (
    "subject_id",
    "cohort",
    "region",
    "layer",
    "layer_name",
    "channels",
    "voxels",
    "vector",
)
SIMILARITY_COLUMNS: Final = ("subject_id", "cohort", "layer", "region_a", "region_b", "cosine")
SUMMARY_COLUMNS: Final = (
    "cohort",
    "layer",
    "region_a",
    "region_b",
    "pair",
    "n",
    "n_nan",
    "mean",
    "sd",
    "median",
    "ci_low",
    "ci_high",
)
TEST_COLUMNS: Final = (
    "family",
    "cohort",
    "layer",
    "pair",
    "test",
    "n",
    "statistic",
    "p_value",
    "q_value",
    "q_value_run",
    "effect_size",
    "effect_name",
    "ci_low",
    "ci_high",
    "status",
    "reason",
    "flag",
)
FLAG_COLUMNS: Final = ("flag", "subject_id", "cohort", "layer", "region", "detail")
FAMILIES: Final = ("within-pairs", "within-depth", "between-pairs", "between-features")

# Sanity flag names (the ``flag`` column of sanity_flags and run_tests).
FLAG_COSINE_ONE: Final = "cosine-one"  # a cosine of exactly 1.0
FLAG_NAN_COSINE: Final = "nan-cosine"  # a missing (NaN) cosine
FLAG_ZERO_NORM: Final = "zero-norm"  # a vector whose norm is 0
FLAG_NON_FINITE: Final = "non-finite"  # a vector holding NaN or inf
FLAG_IDENTICAL_LAYERS: Final = "identical-layers"  # two layers, same vector, same subject+region
FLAG_BELOW_MIN_N: Final = "below-min-n"  # a group smaller than cfg.min_n (test skipped)

# Relative tolerance when counting permuted pseudo-F values >= the observed one,
# so that a permutation reproducing the observed partition counts despite
# rounding (vegan's permutation tests also compare with a small tolerance).
_PERM_TOL: Final = 1e-10
# Cosine distances at or below this are rounding: all vectors point one way.
_SAME_DIRECTION: Final = 1e-12


class StatsInputError(CohortError, ValueError):
    """A features or similarity table cannot be used as given."""


Status = Literal["ok", "skipped"]


@dataclass(frozen=True)
class Result:
    """Outcome of one test on plain arrays.

    ``n`` is the number of subjects the test used (after dropping missing
    values), or had, when skipped. ``reason`` says why a test was skipped, or
    what was dropped from one that ran ("" when nothing was).
    """

    n: int
    statistic: float
    p_value: float
    effect_size: float
    ci_low: float
    ci_high: float
    status: Status
    reason: str
    below_min_n: bool = False


def _skipped(n: int, reason: str, *, below_min_n: bool = False) -> Result:
    nan = float("nan")
    return Result(n, nan, nan, nan, nan, nan, "skipped", reason, below_min_n)


def _join(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def rng_for(seed: int, key: str) -> np.random.Generator:
    """The generator of one test: seeded by ``cfg.seed`` and a CRC-32 of its key."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


# --------------------------------------------------------------------------- inputs


def _require(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise StatsInputError(
            f"{name} table lacks column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(columns)} as the pipeline writes them"
        )


def _unique_in_order(values: pd.Series) -> list[str]:
    return [str(v) for v in pd.unique(values.astype(str))]


def _check_unique(table: pd.DataFrame, keys: list[str], name: str) -> None:
    dup = table.duplicated(subset=keys, keep=False)
    if dup.any():
        first = table.loc[dup, keys].iloc[0].tolist()
        raise StatsInputError(
            f"{name} table has {int(dup.sum())} rows repeating a key ({', '.join(keys)}), "
            f"e.g. {first}; each key must occur once (drop duplicate subjects before the reducer)"
        )


def _vectors(rows: pd.DataFrame, layer: str) -> FloatArray:
    """Stack one layer's vectors into a float64 matrix (one row per table row)."""
    if rows.empty:
        return np.zeros((0, 0), dtype=np.float64)
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in rows["vector"]]
    lengths = {a.size for a in arrays}
    if len(lengths) != 1:
        raise StatsInputError(
            f"layer {layer} has vectors of lengths {sorted(lengths)}; every vector of a layer "
            "must have that layer's channel count"
        )
    return np.stack(arrays)


def _unit_rows(matrix: FloatArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Rows scaled to unit norm; rows that are non-finite or of zero norm become NaN."""
    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(matrix).all(axis=1))
    safe = np.where(finite[:, None], matrix, 0.0)
    norms = np.sqrt(np.einsum("ij,ij->i", safe, safe))
    valid = finite & (norms > 0)
    unit = np.full_like(matrix, np.nan)
    np.divide(safe, norms[:, None], out=unit, where=valid[:, None])
    return unit, valid


def _centre(matrix: FloatArray) -> FloatArray:
    """Subtract the mean of the finite rows (the cohort-wide mean vector)."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.any():
        return matrix
    return matrix - matrix[finite].mean(axis=0)


# --------------------------------------------------------------------------- cosine table


def cosine_table(features: pd.DataFrame, centre: bool = False) -> pd.DataFrame:
    """Cosine similarity between every two regions, per subject and layer.

    Returns the ``similarity`` schema (subject_id, cohort, layer, region_a,
    region_b, cosine) with float64 cosines; pairs ``(region_a, region_b)`` follow
    the regions' order of first appearance (``tibia-femur``,
    ``tibia-background``, ``femur-background``); rows run subject by subject
    (order of first appearance), then layer, then pair.

    ``centre=True`` first subtracts, per layer, the mean vector over the whole
    table (all subjects, all cohorts, all regions) from every vector. Raw CNN
    activations after ReLU are non-negative and share one dominant direction,
    so raw cosines crowd near 1 (the origin study's 0.63-0.98) and mostly
    measure that common direction; after centring, the cosine compares how two
    regions deviate from the typical region, which spreads values over
    [-1, 1]. Centring uses the pooled table, not cohort labels, so it does not
    bias between-cohort tests. Centred and raw cosines are not comparable.

    A vector of zero norm or with non-finite values gives a NaN cosine (and a
    ``zero-norm`` / ``non-finite`` flag in :func:`sanity_flags`), never an
    error. Two bit-identical vectors give exactly 1.0; other values are
    clipped to [-1, 1] against rounding.
    """
    _require(features, FEATURE_COLUMNS, "features")
    _check_unique(features, ["subject_id", "region", "layer"], "features")
    empty = pd.DataFrame({c: pd.Series(dtype=str) for c in SIMILARITY_COLUMNS})
    empty["cosine"] = empty["cosine"].astype(np.float64)
    if features.empty:
        return empty
    _subject_cohorts(features)
    regions = _unique_in_order(features["region"])
    pairs = list(combinations(regions, 2))
    subjects = _unique_in_order(features["subject_id"])
    subject_rank = {s: i for i, s in enumerate(subjects)}
    frames: list[pd.DataFrame] = []
    for layer in _unique_in_order(features["layer"]):
        rows = features[features["layer"].astype(str) == layer].reset_index(drop=True)
        matrix = _vectors(rows, layer)
        if centre:
            matrix = _centre(matrix)
        unit, valid = _unit_rows(matrix)
        where = {
            (str(s), str(r)): i
            for i, (s, r) in enumerate(zip(rows["subject_id"], rows["region"], strict=True))
        }
        cohort_of = dict(
            zip(rows["subject_id"].astype(str), rows["cohort"].astype(str), strict=False)
        )
        for a, b in pairs:
            have = [s for s in subjects if (s, a) in where and (s, b) in where]
            if not have:
                continue
            ia = np.array([where[(s, a)] for s in have], dtype=np.int64)
            ib = np.array([where[(s, b)] for s in have], dtype=np.int64)
            cos = np.einsum("ij,ij->i", unit[ia], unit[ib])
            cos = np.clip(cos, -1.0, 1.0)
            same = valid[ia] & valid[ib] & (matrix[ia] == matrix[ib]).all(axis=1)
            cos[same] = 1.0
            frames.append(
                pd.DataFrame(
                    {
                        "subject_id": have,
                        "cohort": [cohort_of[s] for s in have],
                        "layer": layer,
                        "region_a": a,
                        "region_b": b,
                        "cosine": cos.astype(np.float64),
                        "_s": [subject_rank[s] for s in have],
                    }
                )
            )
    if not frames:
        return empty
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values("_s", kind="stable").drop(columns="_s")
    return table.reset_index(drop=True)[list(SIMILARITY_COLUMNS)]


def _subject_cohorts(table: pd.DataFrame) -> dict[str, str]:
    pairs = table[["subject_id", "cohort"]].astype(str).drop_duplicates()
    repeated = pairs["subject_id"].duplicated(keep=False)
    if repeated.any():
        subject = pairs.loc[repeated, "subject_id"].iloc[0]
        raise StatsInputError(
            f"subject {subject} appears in more than one cohort; a subject belongs to one cohort"
        )
    return dict(zip(pairs["subject_id"], pairs["cohort"], strict=True))


# --------------------------------------------------------------------------- sanity flags


@dataclass(frozen=True)
class _Flag:
    name: str
    subject_id: str
    cohort: str
    layers: tuple[str, ...]
    region: str  # region name, or "a-b" for a pair
    pair: tuple[str, str] | None  # set for flags on a cosine
    detail: str


def _flags(features: pd.DataFrame, similarity: pd.DataFrame) -> list[_Flag]:
    out: list[_Flag] = []
    if not features.empty:
        _require(features, FEATURE_COLUMNS, "features")
        for layer in _unique_in_order(features["layer"]):
            rows = features[features["layer"].astype(str) == layer].reset_index(drop=True)
            matrix = _vectors(rows, layer)
            finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(matrix).all(axis=1))
            safe = np.where(finite[:, None], matrix, 0.0)
            zero = finite & ~(safe != 0).any(axis=1)
            for i in np.flatnonzero(~finite | zero):
                name = FLAG_ZERO_NORM if zero[i] else FLAG_NON_FINITE
                detail = "vector norm is 0" if zero[i] else "vector holds NaN or inf"
                out.append(
                    _Flag(
                        name,
                        str(rows.at[i, "subject_id"]),
                        str(rows.at[i, "cohort"]),
                        (layer,),
                        str(rows.at[i, "region"]),
                        None,
                        detail,
                    )
                )
        layers = _unique_in_order(features["layer"])
        rank = {layer: i for i, layer in enumerate(layers)}
        keyed = features.assign(_k=features["layer"].astype(str).map(rank)).sort_values(
            ["_k"], kind="stable"
        )
        for (subject, region), group in keyed.groupby(
            [keyed["subject_id"].astype(str), keyed["region"].astype(str)], sort=True
        ):
            seen: dict[bytes, str] = {}
            for layer, vector, cohort in zip(
                group["layer"].astype(str),
                group["vector"],
                group["cohort"].astype(str),
                strict=True,
            ):
                raw = np.asarray(vector, dtype=np.float64).ravel()
                if raw.size == 0 or not np.isfinite(raw).all() or not (raw != 0).any():
                    continue
                digest = raw.tobytes()
                if digest in seen:
                    first = seen[digest]
                    out.append(
                        _Flag(
                            FLAG_IDENTICAL_LAYERS,
                            str(subject),
                            cohort,
                            (first, layer),
                            str(region),
                            None,
                            f"layers {first} and {layer} give identical vectors; check the hooks",
                        )
                    )
                else:
                    seen[digest] = layer
    if not similarity.empty:
        _require(similarity, SIMILARITY_COLUMNS, "similarity")
        cos = similarity["cosine"].to_numpy(dtype=np.float64)
        for i in np.flatnonzero(np.isnan(cos) | (cos == 1.0)):
            row = similarity.iloc[i]
            pair = (str(row["region_a"]), str(row["region_b"]))
            one = bool(cos[i] == 1.0)
            out.append(
                _Flag(
                    FLAG_COSINE_ONE if one else FLAG_NAN_COSINE,
                    str(row["subject_id"]),
                    str(row["cohort"]),
                    (str(row["layer"]),),
                    f"{pair[0]}-{pair[1]}",
                    pair,
                    "cosine is exactly 1.0 (identical directions)"
                    if one
                    else "cosine is NaN (missing or zero-norm vector)",
                )
            )
    return out


def sanity_flags(features: pd.DataFrame, similarity: pd.DataFrame) -> pd.DataFrame:
    """List suspicious values, one row each: flag, subject_id, cohort, layer, region, detail.

    Flags: ``cosine-one`` (a cosine of exactly 1.0: the two regions gave the
    same direction, often the same mask or a broken hook; ``region`` names the
    pair), ``nan-cosine``, ``zero-norm`` and ``non-finite`` vectors, and
    ``identical-layers`` (two hooked layers giving bit-identical vectors for
    one subject and region; ``layer`` is ``"conv-1|conv-3"``). Groups below
    ``cfg.min_n`` are flagged on the skipped rows of :func:`run_tests`, since
    they depend on the test. Rows are sorted, so the frame is deterministic.
    """
    records = _flags(features, similarity)
    table = pd.DataFrame(
        {
            "flag": [f.name for f in records],
            "subject_id": [f.subject_id for f in records],
            "cohort": [f.cohort for f in records],
            "layer": ["|".join(f.layers) for f in records],
            "region": [f.region for f in records],
            "detail": [f.detail for f in records],
        },
        columns=list(FLAG_COLUMNS),
    ).astype(str)
    return table.sort_values(list(FLAG_COLUMNS[:5]), kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- summaries


def _percentile_ci(values: FloatArray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _resample_counts(rng: np.random.Generator, n: int, draws: int) -> IntArray:
    """How often each of ``n`` items is drawn in each of ``draws`` bootstrap resamples."""
    idx = rng.integers(0, n, size=(draws, n))
    flat = (idx + n * np.arange(draws)[:, None]).ravel()
    return np.bincount(flat, minlength=draws * n).reshape(draws, n).astype(np.int64)


def _pair_label(a: str, b: str) -> str:
    return f"{a}-{b}"


def summarise(similarity: pd.DataFrame, cfg: StatsConfig) -> pd.DataFrame:
    """Per cohort x layer x region pair: n, n_nan, mean, sd, median and a bootstrap CI.

    Columns: cohort, layer, region_a, region_b, pair ("tibia-femur"), n (non-NaN
    cosines), n_nan (NaN cosines left out), mean, sd (ddof = 1), median, ci_low,
    ci_high. The CI is a seeded percentile bootstrap of the mean
    (``cfg.bootstrap`` resamples of subjects, level ``cfg.ci_level``). sd is NaN
    when n < 2, the CI when n < 2 or ``cfg.bootstrap == 0``, all of them when
    n = 0. Cohorts sorted by name, layers and pairs in order of appearance.
    """
    _require(similarity, SIMILARITY_COLUMNS, "similarity")
    records: list[dict[str, object]] = []
    for key, values in _pair_series(similarity).items():
        cohort, layer, (a, b) = key
        x = values.to_numpy(dtype=np.float64)
        n_nan = int(np.isnan(x).sum())
        x = x[~np.isnan(x)]
        n = int(x.size)
        nan = float("nan")
        mean = float(x.mean()) if n else nan
        sd = float(x.std(ddof=1)) if n >= 2 else nan
        median = float(np.median(x)) if n else nan
        low = high = nan
        if n >= 2 and cfg.bootstrap > 0:
            rng = rng_for(cfg.seed, f"summary|{cohort}|{layer}|{a}-{b}")
            counts = _resample_counts(rng, n, cfg.bootstrap)
            low, high = _percentile_ci((counts @ x) / n, cfg.ci_level)
        records.append(
            {
                "cohort": cohort,
                "layer": layer,
                "region_a": a,
                "region_b": b,
                "pair": _pair_label(a, b),
                "n": n,
                "n_nan": n_nan,
                "mean": mean,
                "sd": sd,
                "median": median,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return _frame(records, SUMMARY_COLUMNS, ints=("n", "n_nan"))


def origin_table(similarity: pd.DataFrame) -> pd.DataFrame:
    """The origin study's table shape, per cohort: what ``similarity.csv`` holds.

    One row per cohort x region pair; columns ``cohort``, ``pair``
    ("tibia-femur") and one column per layer in order of appearance
    (``conv-1``, ``conv-3``, ...), holding the cohort mean of the non-NaN
    cosines (NaN where a cohort has none). Cohorts sorted by name, pairs in
    order of appearance.
    """
    _require(similarity, SIMILARITY_COLUMNS, "similarity")
    layers = _unique_in_order(similarity["layer"]) if not similarity.empty else []
    means: dict[tuple[str, tuple[str, str]], dict[str, float]] = {}
    for (cohort, layer, pair), values in _pair_series(similarity).items():
        x = values.to_numpy(dtype=np.float64)
        x = x[~np.isnan(x)]
        means.setdefault((cohort, pair), {})[layer] = float(x.mean()) if x.size else float("nan")
    records: list[dict[str, object]] = []
    for (cohort, (a, b)), by_layer in means.items():
        row: dict[str, object] = {"cohort": cohort, "pair": _pair_label(a, b)}
        row.update({layer: by_layer.get(layer, float("nan")) for layer in layers})
        records.append(row)
    return _frame(records, ("cohort", "pair", *layers), ints=())


def _frame(
    records: list[dict[str, object]], columns: Sequence[str], ints: Sequence[str]
) -> pd.DataFrame:
    """A frame with fixed column order and dtypes (str -> object, ints, else float64)."""
    table = pd.DataFrame.from_records(records, columns=list(columns))
    for column in columns:
        if column in ints:
            table[column] = table[column].astype(np.int64)
        elif not records or isinstance(records[0][column], str):
            table[column] = table[column].astype(str)
        elif records:
            table[column] = table[column].astype(np.float64)
    return table.reset_index(drop=True)


PairKey = tuple[str, str, tuple[str, str]]


def _pair_series(similarity: pd.DataFrame) -> dict[PairKey, pd.Series]:
    """Cosines per (cohort, layer, pair) indexed by sorted subject id.

    Cohorts sorted; layers and pairs in order of first appearance.
    """
    if similarity.empty:
        return {}
    _check_unique(similarity, ["subject_id", "layer", "region_a", "region_b"], "similarity")
    _subject_cohorts(similarity)
    table = similarity.assign(
        subject_id=similarity["subject_id"].astype(str),
        cohort=similarity["cohort"].astype(str),
        layer=similarity["layer"].astype(str),
        region_a=similarity["region_a"].astype(str),
        region_b=similarity["region_b"].astype(str),
        cosine=similarity["cosine"].astype(np.float64),
    )
    layers = _unique_in_order(table["layer"])
    pairs = list(dict.fromkeys(zip(table["region_a"], table["region_b"], strict=True)))
    out: dict[PairKey, pd.Series] = {}
    groups = dict(list(table.groupby(["cohort", "layer", "region_a", "region_b"])))
    for cohort in sorted(table["cohort"].unique()):
        for layer in layers:
            for a, b in pairs:
                group = groups.get((cohort, layer, a, b))
                if group is None:
                    continue
                series = pd.Series(
                    group["cosine"].to_numpy(), index=group["subject_id"].to_numpy()
                ).sort_index()
                out[(str(cohort), layer, (a, b))] = series
    return out


# --------------------------------------------------------------------------- effect sizes


def _rank_biserial_rows(d: FloatArray) -> FloatArray:
    """Matched-pairs rank-biserial correlation of each row of differences.

    Kerby (2014): r = (T+ - T-) / (T+ + T-), with T+ and T- the sums of the
    ranks of |d| over positive and negative differences. Zero differences are
    dropped first and the rest re-ranked (Wilcoxon's "wilcox" zero method, as
    in the test), so T+ + T- = m(m + 1)/2 for m non-zero differences. Zeros
    are the smallest |d|, so ranking all values and subtracting the number of
    zeros gives the ranks among the non-zero ones. NaN when every difference
    is zero.
    """
    absolute = np.abs(d)
    zeros = (absolute == 0).sum(axis=1)
    ranks = sps.rankdata(absolute, axis=1) - zeros[:, None]
    t_plus = np.where(d > 0, ranks, 0.0).sum(axis=1)
    t_minus = np.where(d < 0, ranks, 0.0).sum(axis=1)
    m = d.shape[1] - zeros
    total = m * (m + 1) / 2.0
    out = np.full(d.shape[0], np.nan)
    np.divide(t_plus - t_minus, total, out=out, where=total > 0)
    return out


def rank_biserial_paired(differences: npt.ArrayLike) -> float:
    """Matched-pairs rank-biserial correlation of paired differences x - y.

    +1: every non-zero difference is positive (x larger in every subject); -1:
    every one negative; 0: positive and negative ranks balance. Zero
    differences are dropped (see :func:`wilcoxon_pairs`).
    """
    d = np.asarray(differences, dtype=np.float64).reshape(1, -1)
    return float(_rank_biserial_rows(d)[0])


def rank_biserial_unpaired(u1: float, n1: int, n2: int) -> float:
    """Rank-biserial correlation from Mann-Whitney U of the first group.

    r = 2 U1 / (n1 n2) - 1 = P(X > Y) - P(X < Y) for a random X of group 1 and
    Y of group 2 (Wendt 1972; Kerby 2014): +1 when every value of group 1
    exceeds every value of group 2.
    """
    return 2.0 * u1 / (n1 * n2) - 1.0


def kendalls_w(chi2: float, n: int, k: int) -> float:
    """Kendall's W from Friedman's chi-square: W = chi2 / (n (k - 1)).

    Agreement of the n subjects in how they rank the k conditions: 1 when all
    subjects rank the layers the same way, 0 when their rankings cancel.
    Uses scipy's tie-corrected chi-square, i.e. the tie-corrected W.
    """
    return chi2 / (n * (k - 1))


def epsilon_squared(h: float, n: int) -> float:
    """Epsilon-squared of Kruskal-Wallis: H / ((n^2 - 1) / (n + 1)) = H / (n - 1).

    Tomczak & Tomczak (2014): the share of rank variance explained by cohort,
    from 0 (no difference) to 1 (cohorts fully separated).
    """
    return h / (n - 1)


# --------------------------------------------------------------------------- single tests


def _scipy(call: Callable[[], object]) -> tuple[object | None, str]:
    """Run a scipy test; return (result, note) with warnings and errors as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except (ValueError, ZeroDivisionError, FloatingPointError) as error:
            return None, f"scipy: {error}"
    note = "; ".join(sorted({f"scipy: {w.message}" for w in caught}))
    return result, note


def _finish(
    result: object | None,
    note: str,
    n: int,
    effect: float,
    ci: tuple[float, float],
    dropped: str,
) -> Result:
    """Turn a scipy result into a Result, refusing a silent NaN p-value."""
    if result is None:
        return _skipped(n, _join(dropped, note))
    statistic = float(getattr(result, "statistic"))  # noqa: B009 - scipy result objects
    p_value = float(getattr(result, "pvalue"))  # noqa: B009
    if not np.isfinite(p_value):
        return _skipped(n, _join(dropped, note, "scipy returned no p-value"))
    return Result(n, statistic, p_value, effect, ci[0], ci[1], "ok", _join(dropped, note))


def _dropped(count: int, what: str) -> str:
    return f"dropped {count} subject(s) with {what}" if count else ""


def wilcoxon_pairs(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> Result:
    """Wilcoxon signed-rank test of paired values x, y (subject = unit), two-sided.

    Asks whether, within subjects, one region pair's cosine tends to exceed
    the other's. scipy.stats.wilcoxon with zero_method="wilcox" (scipy's
    default): subjects whose two cosines are equal carry no sign and are
    dropped before ranking, and the effect size drops them the same way; the
    count is in ``reason``. Subjects with a NaN in either value are dropped.
    Skipped when fewer than ``min_n`` subjects remain or every difference is 0.

    Effect: matched-pairs rank-biserial correlation of x - y (positive: x
    larger). CI: percentile bootstrap over subjects of that correlation.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    dropped = _dropped(int((~keep).sum()), "a NaN cosine")
    d = a[keep] - b[keep]
    n = int(d.size)
    if n < min_n:
        return _skipped(n, _join(dropped, f"n={n} below min_n={min_n}"), below_min_n=True)
    if not (d != 0).any():
        return _skipped(n, _join(dropped, "all differences are zero"))
    zeros = int((d == 0).sum())
    if zeros:
        dropped = _join(dropped, f"{zeros} zero difference(s) left out of the ranks")
    effect = rank_biserial_paired(d)
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        idx = rng.integers(0, n, size=(bootstrap, n))
        ci = _percentile_ci(_rank_biserial_rows(d[idx]), level)
    result, note = _scipy(lambda: sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided"))
    return _finish(result, note, n, effect, ci, dropped)


def friedman_depth(
    data: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    level: float = 0.95,
) -> Result:
    """Friedman test across k >= 3 layers of one region pair (rows = subjects).

    Asks whether a pair's cosine changes with depth, using each subject's
    ranking of the layers. scipy.stats.friedmanchisquare. Subjects with a NaN
    at any layer are dropped. Skipped with fewer than 3 layers, fewer than
    ``min_n`` subjects, or when every subject ties all layers.

    Effect: Kendall's W (see :func:`kendalls_w`). CI: percentile bootstrap
    over subjects of W (rank sums and tie terms of resampled subjects).
    """
    matrix = np.asarray(data, dtype=np.float64)
    if matrix.ndim != 2:
        raise StatsInputError(f"Friedman data must be subjects x layers, got shape {matrix.shape}")
    k = matrix.shape[1]
    keep = ~np.isnan(matrix).any(axis=1)
    dropped = _dropped(int((~keep).sum()), "a NaN cosine at some layer")
    matrix = matrix[keep]
    n = int(matrix.shape[0])
    if k < 3:
        return _skipped(n, _join(dropped, f"Friedman needs >= 3 layers, found {k}"))
    if n < min_n:
        return _skipped(n, _join(dropped, f"n={n} below min_n={min_n}"), below_min_n=True)
    ranks = sps.rankdata(matrix, axis=1)
    spans = sps.rankdata(matrix, axis=1, method="max") - sps.rankdata(matrix, axis=1, method="min")
    # sum over tie groups of t(t^2 - 1) = sum over values of (t^2 - 1), t = span + 1
    ties = ((spans + 1.0) ** 2 - 1.0).sum(axis=1)
    if np.all(ties == k * (k * k - 1)):
        return _skipped(n, _join(dropped, "every subject has equal values at all layers"))
    result, note = _scipy(lambda: sps.friedmanchisquare(*matrix.T))
    effect = float("nan")
    if result is not None:
        effect = kendalls_w(float(getattr(result, "statistic")), n, k)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        counts = _resample_counts(rng, n, bootstrap).astype(np.float64)
        rank_sums = counts @ ranks
        correction = 1.0 - (counts @ ties) / (k * (k * k - 1) * n)
        chi2 = 12.0 / (k * n * (k + 1)) * (rank_sums**2).sum(axis=1) - 3.0 * n * (k + 1)
        w = np.full(bootstrap, np.nan)
        np.divide(chi2, correction * n * (k - 1), out=w, where=correction > 0)
        ci = _percentile_ci(w, level)
    return _finish(result, note, n, effect, ci, dropped)


def _group_sizes_ok(sizes: Sequence[int], names: Sequence[str], min_n: int) -> str:
    small = [f"{name} n={size}" for name, size in zip(names, sizes, strict=True) if size < min_n]
    return f"{', '.join(small)} below min_n={min_n}" if small else ""


def mann_whitney(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    names: tuple[str, str] = ("x", "y"),
    level: float = 0.95,
) -> Result:
    """Mann-Whitney U test, two-sided, of two independent groups (scipy defaults).

    Asks whether values of one cohort tend to exceed the other's. NaN values
    are dropped. Skipped when a group has fewer than ``min_n`` values or all
    values are equal. ``statistic`` is U of the first group.

    Effect: rank-biserial correlation (see :func:`rank_biserial_unpaired`).
    CI: percentile bootstrap of r, resampling subjects within each group.
    """
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    dropped = _dropped(int(np.isnan(a).sum() + np.isnan(b).sum()), "a NaN cosine")
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n1, n2 = int(a.size), int(b.size)
    small = _group_sizes_ok((n1, n2), names, min_n)
    if small:
        return _skipped(n1 + n2, _join(dropped, small), below_min_n=True)
    if np.all(np.concatenate([a, b]) == a[0]):
        return _skipped(n1 + n2, _join(dropped, "all values are equal"))
    result, note = _scipy(lambda: sps.mannwhitneyu(a, b, alternative="two-sided"))
    effect = float("nan")
    if result is not None:
        effect = rank_biserial_unpaired(float(getattr(result, "statistic")), n1, n2)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        wins = (a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])
        c1 = _resample_counts(rng, n1, bootstrap).astype(np.float64)
        c2 = _resample_counts(rng, n2, bootstrap).astype(np.float64)
        u = ((c1 @ wins) * c2).sum(axis=1)
        ci = _percentile_ci(2.0 * u / (n1 * n2) - 1.0, level)
    return _finish(result, note, n1 + n2, effect, ci, dropped)


def kruskal_wallis(
    groups: Sequence[npt.ArrayLike],
    *,
    min_n: int,
    bootstrap: int,
    rng: np.random.Generator,
    names: Sequence[str] | None = None,
    level: float = 0.95,
) -> Result:
    """Kruskal-Wallis H test over three or more independent groups (scipy).

    Asks whether any cohort tends to differ from the others. NaN values are
    dropped. Skipped when a group has fewer than ``min_n`` values or all
    values are equal.

    Effect: epsilon-squared (see :func:`epsilon_squared`). CI: percentile
    bootstrap of epsilon-squared, resampling subjects within each group.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    labels = list(names) if names is not None else [f"group {i + 1}" for i in range(len(arrays))]
    dropped = _dropped(sum(int(np.isnan(g).sum()) for g in arrays), "a NaN cosine")
    arrays = [g[~np.isnan(g)] for g in arrays]
    sizes = [int(g.size) for g in arrays]
    total = sum(sizes)
    small = _group_sizes_ok(sizes, labels, min_n)
    if small:
        return _skipped(total, _join(dropped, small), below_min_n=True)
    pooled = np.concatenate(arrays)
    if np.all(pooled == pooled[0]):
        return _skipped(total, _join(dropped, "all values are equal"))
    result, note = _scipy(lambda: sps.kruskal(*arrays))
    effect = float("nan")
    if result is not None:
        effect = epsilon_squared(float(getattr(result, "statistic")), total)  # noqa: B009
    ci = (float("nan"), float("nan"))
    if bootstrap > 0:
        parts = [g[rng.integers(0, g.size, size=(bootstrap, g.size))] for g in arrays]
        values = np.concatenate(parts, axis=1)
        ranks = sps.rankdata(values, axis=1)
        spans = sps.rankdata(values, axis=1, method="max") - sps.rankdata(
            values, axis=1, method="min"
        )
        correction = 1.0 - ((spans + 1.0) ** 2 - 1.0).sum(axis=1) / (total**3 - total)
        edges = np.cumsum([0, *sizes])
        between = sum(ranks[:, lo:hi].sum(axis=1) ** 2 / (hi - lo) for lo, hi in pairwise(edges))
        h_raw = 12.0 / (total * (total + 1)) * between - 3.0 * (total + 1)
        h = np.full(bootstrap, np.nan)
        np.divide(h_raw, correction, out=h, where=correction > 0)
        ci = _percentile_ci(h / (total - 1), level)
    return _finish(result, note, total, effect, ci, dropped)


def cosine_distances(vectors: npt.ArrayLike) -> FloatArray:
    """Cosine distance 1 - cos between every two rows (rows must have non-zero norm).

    Bit-identical rows (and the diagonal) get exactly 0.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    unit, valid = _unit_rows(matrix)
    if not valid.all():
        raise StatsInputError("cosine distance needs finite rows of non-zero norm")
    dist = 1.0 - np.clip(unit @ unit.T, -1.0, 1.0)
    _, twin = np.unique(matrix, axis=0, return_inverse=True)
    dist[twin[:, None] == twin[None, :]] = 0.0  # identical rows: exactly 0, not rounding
    return dist


def _pseudo_f(
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
    vectors); the statistic is Anderson's (2001) pseudo-F (see :func:`_pseudo_f`). The
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
    _, valid = _unit_rows(matrix)
    dropped = _dropped(int((~valid).sum()), "a zero-norm or non-finite vector")
    matrix, codes = matrix[valid], codes[valid]
    sizes = np.bincount(codes, minlength=g).astype(np.int64)
    n = int(codes.size)
    small = _group_sizes_ok([int(s) for s in sizes], group_names, min_n)
    if g < 2:
        return _skipped(n, _join(dropped, "one cohort"))
    if small:
        return _skipped(n, _join(dropped, small), below_min_n=True)
    if n - g < 1:
        return _skipped(n, _join(dropped, "no within-group degrees of freedom (N = groups)"))
    if permutations < 1:
        return _skipped(n, _join(dropped, "permutations is 0"))
    # Anderson's formula takes squared distances. The cosine distance 1 - cos of
    # two vectors is half the squared Euclidean distance between their unit
    # vectors, so it *is* a squared Euclidean distance: the sums of squares
    # partition (SS_T = SS_W + SS_A, with SS_A >= 0 and F >= 0). Squaring it
    # again would give a non-Euclidean measure whose SS_A can turn negative.
    dist_sq = cosine_distances(matrix)
    if not (dist_sq > _SAME_DIRECTION).any():
        return _skipped(n, _join(dropped, "all vectors point the same way (zero distances)"))
    f_obs_arr, r2_obs = _pseudo_f(dist_sq, codes[None, :], sizes)
    f_obs = float(f_obs_arr[0])
    shuffled = rng.permuted(np.tile(codes, (permutations, 1)), axis=1)
    f_perm, _ = _pseudo_f(dist_sq, shuffled, sizes)
    threshold = f_obs - _PERM_TOL * max(1.0, abs(f_obs)) if np.isfinite(f_obs) else f_obs
    exceed = int((f_perm >= threshold).sum())
    p_value = (1.0 + exceed) / (1.0 + permutations)
    nan = float("nan")
    return Result(n, f_obs, p_value, float(r2_obs[0]), nan, nan, "ok", dropped)


# --------------------------------------------------------------------------- FDR


def bh_qvalues(p_values: npt.ArrayLike) -> FloatArray:
    """Benjamini-Hochberg (1995) adjusted p-values (q-values), same order as the input.

    q_(i) = min_{j >= i} min(1, m p_(j) / j) over the ascending p-values
    p_(1) <= ... <= p_(m). NaN entries are left out of m and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = present.size
    if m == 0:
        return out
    if np.any((p[present] < 0) | (p[present] > 1)):
        raise StatsInputError("p-values must lie in [0, 1]")
    order = present[np.argsort(p[present], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.minimum(q, 1.0)
    return out


# --------------------------------------------------------------------------- run_tests


@dataclass(frozen=True)
class _Scope:
    """What data a test row touches, to attach sanity flags."""

    cohorts: frozenset[str]
    layers: frozenset[str]
    pairs: frozenset[tuple[str, str]]
    regions: frozenset[str]


@dataclass(frozen=True)
class _Row:
    family: str
    cohort: str
    layer: str
    pair: str
    test: str
    effect_name: str
    result: Result
    scope: _Scope


_TESTS: Final = {  # family -> (test, effect name) per kind of comparison
    "wilcoxon": ("within-pairs", "rank-biserial"),
    "friedman": ("within-depth", "kendall-w"),
    "mannwhitneyu": ("between-pairs", "rank-biserial"),
    "kruskal": ("between-pairs", "epsilon-squared"),
    "permanova": ("between-features", "r-squared"),
}


def _make_row(test: str, cohort: str, layer: str, pair: str, result: Result, scope: _Scope) -> _Row:
    family, effect_name = _TESTS[test]
    return _Row(family, cohort, layer, pair, test, effect_name, result, scope)


def _key(test: str, cohort: str, layer: str, pair: str) -> str:
    """The seed key of a test: stable across runs and independent of other tests."""
    return f"{_TESTS[test][0]}|{cohort}|{layer}|{pair}|{test}"


def _flag_text(flags: list[_Flag], scope: _Scope, below_min_n: bool) -> str:
    names: set[str] = {FLAG_BELOW_MIN_N} if below_min_n else set()
    for flag in flags:
        if flag.cohort not in scope.cohorts or not scope.layers.intersection(flag.layers):
            continue
        if flag.pair is not None:
            if flag.pair in scope.pairs:
                names.add(flag.name)
        elif flag.region in scope.regions:
            names.add(flag.name)
    return ";".join(sorted(names))


class _Cosines:
    """The similarity table arranged for the tests (cohorts sorted, subjects sorted)."""

    def __init__(self, similarity: pd.DataFrame) -> None:
        self.series = _pair_series(similarity)
        self.cohorts = sorted({k[0] for k in self.series})
        self.layers = list(dict.fromkeys(k[1] for k in self.series))
        self.pairs = list(dict.fromkeys(k[2] for k in self.series))

    def get(self, cohort: str, layer: str, pair: tuple[str, str]) -> pd.Series:
        return self.series.get((cohort, layer, pair), pd.Series(dtype=np.float64))

    def values(self, cohort: str, layer: str, pair: tuple[str, str]) -> FloatArray:
        return self.get(cohort, layer, pair).to_numpy(dtype=np.float64)


def _within_pairs(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for cohort in cos.cohorts:
        for layer in cos.layers:
            for p1, p2 in combinations(cos.pairs, 2):
                frame = pd.concat([cos.get(cohort, layer, p1), cos.get(cohort, layer, p2)], axis=1)
                both = frame.sort_index().to_numpy(dtype=np.float64).reshape(-1, 2)
                label = f"{_pair_label(*p1)}|{_pair_label(*p2)}"
                result = wilcoxon_pairs(
                    both[:, 0],
                    both[:, 1],
                    min_n=cfg.min_n,
                    bootstrap=cfg.bootstrap,
                    rng=rng_for(cfg.seed, _key("wilcoxon", cohort, layer, label)),
                    level=cfg.ci_level,
                )
                scope = _Scope(
                    frozenset({cohort}), frozenset({layer}), frozenset({p1, p2}), frozenset(p1 + p2)
                )
                rows.append(_make_row("wilcoxon", cohort, layer, label, result, scope))
    return rows


def _within_depth(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for cohort in cos.cohorts:
        for pair in cos.pairs:
            present = [layer for layer in cos.layers if (cohort, layer, pair) in cos.series]
            columns = [cos.get(cohort, layer, pair) for layer in present]
            table = pd.concat(columns, axis=1).sort_index() if columns else pd.DataFrame()
            matrix = table.to_numpy(dtype=np.float64).reshape(len(table), len(present))
            layer_label, label = "|".join(present), _pair_label(*pair)
            result = friedman_depth(
                matrix,
                min_n=cfg.min_n,
                bootstrap=cfg.bootstrap,
                rng=rng_for(cfg.seed, _key("friedman", cohort, layer_label, label)),
                level=cfg.ci_level,
            )
            scope = _Scope(
                frozenset({cohort}), frozenset(present), frozenset({pair}), frozenset(pair)
            )
            rows.append(_make_row("friedman", cohort, layer_label, label, result, scope))
    return rows


def _between_pairs(cos: _Cosines, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    for layer in cos.layers:
        for pair in cos.pairs:
            label = _pair_label(*pair)

            def scope(
                cohorts: Sequence[str], layer: str = layer, pair: tuple[str, str] = pair
            ) -> _Scope:
                return _Scope(
                    frozenset(cohorts), frozenset({layer}), frozenset({pair}), frozenset(pair)
                )

            if len(cos.cohorts) < 2:
                for cohort in cos.cohorts:
                    n = int(np.count_nonzero(~np.isnan(cos.values(cohort, layer, pair))))
                    result = _skipped(n, "one cohort")
                    rows.append(
                        _make_row("mannwhitneyu", cohort, layer, label, result, scope([cohort]))
                    )
                continue
            for c1, c2 in combinations(cos.cohorts, 2):
                joined = f"{c1}|{c2}"
                result = mann_whitney(
                    cos.values(c1, layer, pair),
                    cos.values(c2, layer, pair),
                    min_n=cfg.min_n,
                    bootstrap=cfg.bootstrap,
                    rng=rng_for(cfg.seed, _key("mannwhitneyu", joined, layer, label)),
                    names=(c1, c2),
                    level=cfg.ci_level,
                )
                rows.append(
                    _make_row("mannwhitneyu", joined, layer, label, result, scope([c1, c2]))
                )
            if len(cos.cohorts) >= 3:
                joined = "|".join(cos.cohorts)
                result = kruskal_wallis(
                    [cos.values(c, layer, pair) for c in cos.cohorts],
                    min_n=cfg.min_n,
                    bootstrap=cfg.bootstrap,
                    rng=rng_for(cfg.seed, _key("kruskal", joined, layer, label)),
                    names=cos.cohorts,
                    level=cfg.ci_level,
                )
                rows.append(_make_row("kruskal", joined, layer, label, result, scope(cos.cohorts)))
    return rows


def _between_features(features: pd.DataFrame, cfg: StatsConfig) -> list[_Row]:
    rows: list[_Row] = []
    if features.empty:
        return rows
    _check_unique(features, ["subject_id", "region", "layer"], "features")
    _subject_cohorts(features)
    regions = _unique_in_order(features["region"])
    for layer in _unique_in_order(features["layer"]):
        frame = features[features["layer"].astype(str) == layer].reset_index(drop=True)
        matrix = _vectors(frame, layer)
        if cfg.centre:
            matrix = _centre(matrix)
        for region in regions:
            mask = (frame["region"].astype(str) == region).to_numpy()
            ids = frame.loc[mask, "subject_id"].astype(str).to_numpy()
            order = np.argsort(ids, kind="stable")
            cohorts = frame.loc[mask, "cohort"].astype(str).to_numpy()[order]
            vectors = matrix[mask][order]
            present = sorted(set(cohorts.tolist()))

            def scope(group: Sequence[str], layer: str = layer, region: str = region) -> _Scope:
                return _Scope(
                    frozenset(group), frozenset({layer}), frozenset(), frozenset({region})
                )

            if len(present) < 2:
                for cohort in present:
                    result = _skipped(int(ids.size), "one cohort")
                    rows.append(
                        _make_row("permanova", cohort, layer, region, result, scope([cohort]))
                    )
                continue
            groups: list[tuple[str, ...]] = list(combinations(present, 2))
            if len(present) >= 3:
                groups.append(tuple(present))
            for group in groups:
                joined = "|".join(group)
                keep = np.isin(cohorts, group)
                codes = np.array([group.index(c) for c in cohorts[keep]], dtype=np.int64)
                result = permanova(
                    vectors[keep],
                    codes,
                    min_n=cfg.min_n,
                    permutations=cfg.permutations,
                    rng=rng_for(cfg.seed, _key("permanova", joined, layer, region)),
                    names=group,
                )
                rows.append(_make_row("permanova", joined, layer, region, result, scope(group)))
    return rows


def run_tests(features: pd.DataFrame, similarity: pd.DataFrame, cfg: StatsConfig) -> pd.DataFrame:
    """Every within- and between-cohort test, one row each, with BH q-values.

    Families (``family`` column), tests (``test``) and effect sizes (``effect_name``):

    - ``within-pairs``: per cohort x layer x two region pairs (``pair`` =
      "tibia-femur|tibia-background"), paired over subjects: ``wilcoxon``,
      ``rank-biserial`` (positive: the first pair is more similar). See
      :func:`wilcoxon_pairs`.
    - ``within-depth``: per cohort x region pair, across all layers
      (``layer`` = "conv-1|conv-3|conv-5"): ``friedman``, ``kendall-w``. See
      :func:`friedman_depth`.
    - ``between-pairs``: per layer x region pair, cosines of independent
      cohorts: ``mannwhitneyu`` for every two cohorts (``cohort`` = "a|b",
      ``rank-biserial``, positive: a higher) and ``kruskal`` over all cohorts
      when there are >= 3 (``epsilon-squared``). See :func:`mann_whitney`,
      :func:`kruskal_wallis`.
    - ``between-features``: per layer x region (``pair`` = the region), the
      subjects' vectors (centred first when ``cfg.centre``, with the pooled
      mean, which permuting labels leaves unchanged): ``permanova`` for every
      two cohorts and for all cohorts when >= 3, ``r-squared``. See
      :func:`permanova`.

    Columns, in order: family, cohort, layer, pair, test, n, statistic,
    p_value, q_value (BH within the family), q_value_run (BH over every test
    that ran), effect_size, effect_name, ci_low, ci_high (bootstrap CI of the
    effect size; NaN for permanova), status ("ok" / "skipped"), reason (why
    skipped, or what was dropped), flag (";"-joined sanity flags touching the
    test's data, plus ``below-min-n`` on rows skipped for it; "" when none).
    With one cohort the between families get one skipped row per layer x pair
    (or region) with reason "one cohort". Rows run family by family in the
    order above, then as the loops go (cohorts sorted, layers and pairs in
    order of appearance); the frame is byte-identical for the same inputs and
    cfg.
    """
    _require(features, FEATURE_COLUMNS, "features")
    _require(similarity, SIMILARITY_COLUMNS, "similarity")
    flags = _flags(features, similarity)
    cos = _Cosines(similarity)
    rows = [
        *_within_pairs(cos, cfg),
        *_within_depth(cos, cfg),
        *_between_pairs(cos, cfg),
        *_between_features(features, cfg),
    ]
    return _assemble(rows, flags)


_FLOAT_COLUMNS: Final = (
    "statistic",
    "p_value",
    "q_value",
    "q_value_run",
    "effect_size",
    "ci_low",
    "ci_high",
)


def _assemble(rows: list[_Row], flags: list[_Flag]) -> pd.DataFrame:
    """Rows to the fixed-column frame, with q-values per family and over the run."""
    table = pd.DataFrame(
        {
            "family": [r.family for r in rows],
            "cohort": [r.cohort for r in rows],
            "layer": [r.layer for r in rows],
            "pair": [r.pair for r in rows],
            "test": [r.test for r in rows],
            "n": np.array([r.result.n for r in rows], dtype=np.int64),
            "statistic": [r.result.statistic for r in rows],
            "p_value": [r.result.p_value for r in rows],
            "effect_size": [r.result.effect_size for r in rows],
            "effect_name": [r.effect_name for r in rows],
            "ci_low": [r.result.ci_low for r in rows],
            "ci_high": [r.result.ci_high for r in rows],
            "status": [r.result.status for r in rows],
            "reason": [r.result.reason for r in rows],
            "flag": [_flag_text(flags, r.scope, r.result.below_min_n) for r in rows],
        }
    )
    p = table["p_value"].to_numpy(dtype=np.float64)
    ok = (table["status"] == "ok").to_numpy(dtype=bool)
    family = table["family"].to_numpy(dtype=object)
    q_family = np.full(p.shape, np.nan)
    for name in FAMILIES:
        members = ok & (family == name)
        q_family[members] = bh_qvalues(p[members])
    q_run = np.full(p.shape, np.nan)
    q_run[ok] = bh_qvalues(p[ok])
    table["q_value"] = q_family
    table["q_value_run"] = q_run
    table = table[list(TEST_COLUMNS)]
    for column in TEST_COLUMNS:
        if column in _FLOAT_COLUMNS:
            table[column] = table[column].astype(np.float64)
        elif column != "n":
            table[column] = table[column].astype(str)
    return table.reset_index(drop=True)
