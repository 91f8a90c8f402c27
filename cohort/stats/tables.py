"""Feature and similarity tables: checks, vector matrices and the cosine table.

The inputs are the pipeline's tables read into pandas, with the columns of
:mod:`cohort.outputs.schemas` (``features``: one float32 vector per subject x
region x layer; ``similarity``: one cosine per subject x layer x region pair).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import numpy.typing as npt
import pandas as pd

from cohort.errors import StatsInputError
from cohort.outputs.schemas import (
    FEATURES_COLUMNS,
    SIMILARITY_COLUMNS,
    SIMILARITY_SCHEMA,
    empty_frame,
)
from cohort.stats.common import FloatArray

__all__ = ["PairKey", "cosine_table", "pair_series"]


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


def layer_matrix(rows: pd.DataFrame, layer: str) -> FloatArray:
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
    """Subtract the mean of the finite rows (the cohort-wide mean vector)."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.any():
        return matrix
    return matrix - matrix[finite].mean(axis=0)


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
    require_columns(features, FEATURES_COLUMNS, "features")
    check_unique(features, ["subject_id", "region", "layer"], "features")
    empty = empty_frame(SIMILARITY_SCHEMA)
    if features.empty:
        return empty
    subject_cohorts(features)
    regions = unique_in_order(features["region"])
    pairs = list(combinations(regions, 2))
    subjects = unique_in_order(features["subject_id"])
    subject_rank = {s: i for i, s in enumerate(subjects)}
    frames: list[pd.DataFrame] = []
    for layer in unique_in_order(features["layer"]):
        rows = features[features["layer"].astype(str) == layer].reset_index(drop=True)
        matrix = layer_matrix(rows, layer)
        if centre:
            matrix = centre_rows(matrix)
        unit, valid = unit_rows(matrix)
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

    Cohorts sorted; layers and pairs in order of first appearance.
    """
    if similarity.empty:
        return {}
    check_unique(similarity, ["subject_id", "layer", "region_a", "region_b"], "similarity")
    subject_cohorts(similarity)
    table = similarity.assign(
        subject_id=similarity["subject_id"].astype(str),
        cohort=similarity["cohort"].astype(str),
        layer=similarity["layer"].astype(str),
        region_a=similarity["region_a"].astype(str),
        region_b=similarity["region_b"].astype(str),
        cosine=similarity["cosine"].astype(np.float64),
    )
    layers = unique_in_order(table["layer"])
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
