"""Feature and similarity tables: checks, vector matrices and the cosine table.

The inputs are the pipeline's tables read into pandas, with the columns of
:mod:`cohort.outputs.schemas` (``features``: one float32 vector per subject x
region x layer; ``similarity``: one cosine per subject x layer x region pair).

Linear in the number of rows: subjects, regions and layers become integer
codes once (:class:`FeatureKeys`, ``pd.factorize``), a layer's vectors one
matrix (:func:`vector_matrix`, from the single Arrow buffer when the column is
kept in Arrow), and the work is numpy over those; no Python loop runs per
subject.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from cohort.errors import StatsInputError
from cohort.outputs.schemas import (
    FEATURES_COLUMNS,
    SIMILARITY_COLUMNS,
    SIMILARITY_SCHEMA,
    empty_frame,
)
from cohort.stats.common import FloatArray, IntArray

__all__ = [
    "FeatureSpace",
    "PairKey",
    "chosen_cosines",
    "cosine_table",
    "feature_spaces",
    "pair_series",
    "row_cosines",
]


def require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise StatsInputError(
            f"{name} table lacks column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(columns)} as the pipeline writes them"
        )


def unique_in_order(values: pd.Series) -> list[str]:
    return [str(v) for v in pd.unique(values.astype(str))]


def check_unique(table: pd.DataFrame, keys: list[str], name: str) -> None:
    dup = table.duplicated(subset=keys, keep=False)
    if dup.any():
        first = table.loc[dup, keys].iloc[0].tolist()
        raise StatsInputError(
            f"{name} table has {int(dup.sum())} rows repeating a key ({', '.join(keys)}), "
            f"e.g. {first}; each key must occur once (drop duplicate subjects before the reducer)"
        )


def vector_matrix(vectors: pd.Series, layer: str) -> FloatArray:
    """One layer's vectors as a float64 matrix, one row per entry of ``vectors``.

    A column kept in Arrow (``pd.ArrowDtype`` list, as the reducer reads
    ``features.parquet``) is read from its one flat buffer of values; a
    column of per-row arrays (built in memory) is stacked row by row.
    """
    return stored_matrix(vectors, layer).astype(np.float64, copy=False)


def stored_matrix(vectors: pd.Series, layer: str) -> npt.NDArray[np.floating[Any]]:
    """:func:`vector_matrix` in the type the vectors are stored in (float32 in Arrow).

    Converting float32 to float64 is exact, so values (and their bits, for
    non-NaN values) compare the same either way, in half the memory.
    """
    if vectors.empty:
        return np.zeros((0, 0), dtype=np.float64)
    if isinstance(vectors.dtype, pd.ArrowDtype) and pa.types.is_list(vectors.dtype.pyarrow_dtype):
        lists = pa.array(vectors.array)
        lengths = lists.value_lengths().fill_null(0).to_numpy()
        if lists.null_count == 0 and lengths.min() == lengths.max():
            flat = lists.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(len(lists), int(lengths[0]))
        raise StatsInputError(
            f"layer {layer} has vectors of lengths {sorted(set(lengths.tolist()))}; every "
            "vector of a layer must have that layer's channel count"
        )
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in vectors]
    lengths_found = {a.size for a in arrays}
    if len(lengths_found) != 1:
        raise StatsInputError(
            f"layer {layer} has vectors of lengths {sorted(lengths_found)}; every vector of a "
            "layer must have that layer's channel count"
        )
    return np.stack(arrays)


def unit_rows(matrix: FloatArray) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Rows scaled to unit norm; rows that are non-finite or of zero norm become NaN."""
    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(matrix).all(axis=1))
    safe = np.where(finite[:, None], matrix, 0.0)
    norms = np.sqrt(np.einsum("ij,ij->i", safe, safe))
    valid = finite & (norms > 0)
    unit = np.full_like(matrix, np.nan)
    np.divide(safe, norms[:, None], out=unit, where=valid[:, None])
    return unit, valid


def centre_rows(matrix: FloatArray) -> FloatArray:
    """Subtract the mean of the finite rows (the run's mean vector, over every subject
    and region, when ``matrix`` is a layer's vectors)."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.any():
        return matrix
    return matrix - matrix[finite].mean(axis=0)


def cosine_table(features: pd.DataFrame) -> pd.DataFrame:
    """Cosine similarity between every two regions, per subject and layer, raw and centred.

    Returns the ``similarity`` schema (:data:`~cohort.outputs.schemas.SIMILARITY_SCHEMA`:
    subject_id, cohort, layer, region_a, region_b, cosine, cosine_centred), float64;
    pairs ``(region_a, region_b)`` follow the regions' order of first appearance
    (``tibia-femur``, ``tibia-background``, ``femur-background``); rows run
    subject by subject (order of first appearance), then layer, then pair.

    ``cosine`` is the cosine of the pooled vectors as they are (the origin
    study's number). ``cosine_centred`` first subtracts, per layer, the mean
    vector over the whole table (all subjects, all cohorts, all regions) from
    every vector. Raw CNN activations after ReLU are non-negative and share one
    dominant direction, so raw cosines crowd near 1 (the origin study's
    0.63-0.98) and mostly measure that common direction; after centring, the
    cosine compares how two regions deviate from the typical region, which
    spreads values over [-1, 1]. Centring uses the pooled table, not cohort
    labels, so it does not bias between-cohort tests; it depends on which
    subjects the table holds. Centred and raw cosines are not comparable.

    A vector of zero norm or with non-finite values gives a NaN cosine (and a
    ``zero-norm`` / ``non-finite`` flag in :func:`sanity_flags`), never an
    error. Two bit-identical vectors give exactly 1.0; other values are
    clipped to [-1, 1] against rounding.
    """
    require_columns(features, FEATURES_COLUMNS, "features")
    check_unique(features, ["subject_id", "region", "layer"], "features")
    empty = empty_frame(SIMILARITY_SCHEMA)
    if features.empty:
        return empty
    subject_cohorts(features)
    keys = FeatureKeys(features)
    pairs = list(combinations(range(len(keys.regions)), 2))
    parts: dict[str, list[npt.NDArray[Any]]] = {
        name: [] for name in ("subject", "layer", "a", "b", "cosine", "cosine_centred")
    }
    for li, layer in enumerate(keys.layers):
        rows = keys.layer_rows(layer)
        where = keys.where(rows)
        present = []
        for a, b in pairs:
            have = np.flatnonzero((where[:, a] >= 0) & (where[:, b] >= 0))
            if have.size:
                present.append((where[have, a], where[have, b]))
                parts["subject"].append(have)
                for name, code in (("layer", li), ("a", a), ("b", b)):
                    parts[name].append(np.full(have.size, code, dtype=np.int64))
        # raw, then centred: one matrix and its unit rows in memory at a time
        matrix = vector_matrix(features["vector"].iloc[rows], layer)
        for name in ("cosine", "cosine_centred"):
            if name == "cosine_centred":
                matrix = centre_rows(matrix)
            units = unit_rows(matrix)
            parts[name] += [row_cosines(matrix, ia, ib, units) for ia, ib in present]
            del units
    if not parts["subject"]:
        return empty
    column = {name: np.concatenate(blocks) for name, blocks in parts.items()}
    order = np.argsort(column["subject"], kind="stable")  # subject, then layer, then pair
    subject = column["subject"][order]
    table = {
        "subject_id": _text(keys.subjects, subject),
        "cohort": _text(keys.cohorts, subject),
        "layer": _text(keys.layers, column["layer"][order]),
        "region_a": _text(keys.regions, column["a"][order]),
        "region_b": _text(keys.regions, column["b"][order]),
        "cosine": column["cosine"][order],
        "cosine_centred": column["cosine_centred"][order],
    }
    return pd.DataFrame(table)[list(SIMILARITY_COLUMNS)]


def _text(
    values: Sequence[str] | npt.NDArray[Any], codes: IntArray
) -> pd.api.extensions.ExtensionArray:
    """``values[codes]`` as pandas' string column, built from the few distinct values
    (pandas' string type, as a column of Python strings would become, without a
    Python string per row)."""
    return pd.Series(np.asarray(values, dtype=object)).array.take(codes)


class FeatureKeys:
    """Integer codes of a features table's subjects, regions and layers.

    ``subjects`` (order of first appearance), ``cohorts`` (each subject's),
    ``regions`` and ``layers`` (order of first appearance); :meth:`where`
    maps (subject, region) to the row of one layer's block. Keys must be
    unique (:func:`check_unique`).
    """

    def __init__(self, features: pd.DataFrame) -> None:
        # factorised in Arrow where the columns are: no Python string per row
        subject, subjects = pd.factorize(features["subject_id"].astype(str))
        region, regions = pd.factorize(features["region"].astype(str))
        layer, layers = pd.factorize(features["layer"].astype(str))
        cohort, cohorts = pd.factorize(features["cohort"].astype(str))
        self.subjects = np.asarray(subjects, dtype=object)
        self.regions = [str(r) for r in regions]
        self.layers = [str(v) for v in layers]
        self.subject = subject.astype(np.int64)
        self.region = region.astype(np.int64)
        self.layer = layer.astype(np.int64)
        self.cohorts = np.empty(self.subjects.size, dtype=object)
        self.cohorts[self.subject] = np.asarray(cohorts, dtype=object)[cohort]

    def layer_rows(self, layer: str) -> IntArray:
        """Positions (row numbers) of ``layer``'s rows, in table order."""
        return np.flatnonzero(self.layer == self.layers.index(layer))

    def where(self, rows: IntArray) -> IntArray:
        """subjects x regions: the index into ``rows`` of each (subject, region), or -1."""
        where = np.full((self.subjects.size, len(self.regions)), -1, dtype=np.int64)
        where[self.subject[rows], self.region[rows]] = np.arange(rows.size, dtype=np.int64)
        return where


def row_cosines(
    matrix: FloatArray,
    ia: IntArray,
    ib: IntArray,
    units: tuple[FloatArray, npt.NDArray[np.bool_]] | None = None,
) -> FloatArray:
    """Cosine of rows ``ia`` and ``ib`` of ``matrix``, float64, in [-1, 1].

    NaN where a row is non-finite or of zero norm; exactly 1.0 where the two
    rows are bit-identical. ``units`` is :func:`unit_rows` of ``matrix`` when
    the caller has it already.
    """
    unit, valid = unit_rows(matrix) if units is None else units
    cos = np.clip(np.einsum("ij,ij->i", unit[ia], unit[ib]), -1.0, 1.0)
    same = valid[ia] & valid[ib] & (matrix[ia] == matrix[ib]).all(axis=1)
    cos[same] = 1.0
    return cos.astype(np.float64)


def chosen_cosines(similarity: pd.DataFrame, centre: bool) -> pd.DataFrame:
    """``similarity`` whose ``cosine`` column holds the cosines a run's statistics use:
    the raw ones, or (``centre``) the centred ones."""
    if not centre:
        return similarity
    if "cosine_centred" not in similarity.columns:
        raise StatsInputError(
            "the similarity table has no cosine_centred column, so centred statistics "
            "cannot be computed; rerun `cohort stats DIR` to rewrite it, or use raw cosines"
        )
    return similarity.assign(cosine=similarity["cosine_centred"])


def subject_cohorts(table: pd.DataFrame) -> dict[str, str]:
    pairs = table[["subject_id", "cohort"]].astype(str).drop_duplicates()
    repeated = pairs["subject_id"].duplicated(keep=False)
    if repeated.any():
        subject = pairs.loc[repeated, "subject_id"].iloc[0]
        raise StatsInputError(
            f"subject {subject} appears in more than one cohort; a subject belongs to one cohort"
        )
    return dict(zip(pairs["subject_id"], pairs["cohort"], strict=True))


PairKey = tuple[str, str, tuple[str, str]]


def pair_series(similarity: pd.DataFrame) -> dict[PairKey, pd.Series]:
    """Cosines per (cohort, layer, pair) indexed by sorted subject id.

    Cohorts sorted; layers and pairs in order of first appearance. One sort of
    integer keys (group, then the subject's rank by id) over the whole table.
    """
    if similarity.empty:
        return {}
    check_unique(similarity, ["subject_id", "layer", "region_a", "region_b"], "similarity")
    subject_cohorts(similarity)
    # factorised in Arrow where the columns are: no Python string per row
    subject_code, subjects = pd.factorize(similarity["subject_id"].astype(str))
    cohort_code, cohort_names = pd.factorize(similarity["cohort"].astype(str))
    layer_code, layers = pd.factorize(similarity["layer"].astype(str))
    a_code, a_names = pd.factorize(similarity["region_a"].astype(str))
    b_code, b_names = pd.factorize(similarity["region_b"].astype(str))
    cosine = similarity["cosine"].to_numpy(dtype=np.float64)
    cohorts = sorted(str(c) for c in cohort_names)
    sorted_cohort = pd.Index(cohorts).get_indexer(pd.Index(cohort_names))[cohort_code]
    pair_code, pair_first = pd.factorize(a_code * len(b_names) + b_code)
    a_list, b_list = [str(a) for a in a_names], [str(b) for b in b_names]
    pairs = [(a_list[int(c) // len(b_list)], b_list[int(c) % len(b_list)]) for c in pair_first]
    ids = np.asarray(subjects, dtype=object)
    rank = np.empty(ids.size, dtype=np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(ids.size)
    group = (sorted_cohort.astype(np.int64) * len(layers) + layer_code) * len(pairs) + pair_code
    order = np.lexsort((rank[subject_code], group))
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    out: dict[PairKey, pd.Series] = {}
    for lo, hi in zip(starts, [*starts[1:], order.size], strict=True):
        rows = order[lo:hi]
        key = int(group[rows[0]])
        c, rest = divmod(key, len(layers) * len(pairs))
        li, pi = divmod(rest, len(pairs))
        out[(cohorts[c], str(layers[li]), pairs[pi])] = pd.Series(
            cosine[rows], index=ids[subject_code[rows]]
        )
    return out


@dataclass(frozen=True)
class FeatureSpace:
    """One layer x region of a features table: subjects sorted by id, their cohorts and
    vectors (float64, centred on the layer's pooled mean when asked)."""

    layer: str
    region: str
    ids: npt.NDArray[np.object_]
    cohorts: npt.NDArray[np.object_]
    vectors: FloatArray


def feature_spaces(features: pd.DataFrame, centre: bool) -> Iterator[FeatureSpace]:
    """Every layer x region of ``features`` (layers, then regions, in order of appearance).

    With ``centre``, a layer's vectors are centred on the mean of its finite rows
    (all subjects and regions: the pooled mean, which cohort labels do not touch).
    """
    if features.empty:
        return
    check_unique(features, ["subject_id", "region", "layer"], "features")
    subject_cohorts(features)
    keys = FeatureKeys(features)
    for layer in keys.layers:
        layer_rows = keys.layer_rows(layer)
        matrix = vector_matrix(features["vector"].iloc[layer_rows], layer)
        if centre:
            matrix = centre_rows(matrix)
        for code, region in enumerate(keys.regions):
            mask = keys.region[layer_rows] == code
            subject = keys.subject[layer_rows[mask]]
            ids = keys.subjects[subject]
            order = np.argsort(ids, kind="stable")
            yield FeatureSpace(
                layer, region, ids[order], keys.cohorts[subject][order], matrix[mask][order]
            )
