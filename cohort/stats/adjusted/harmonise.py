"""ComBat on a features table: the pooled feature matrix, harmonised tables, site effect.

Each channel of each layer x region is one feature of the pooled matrix (one
row per subject, subjects sorted by id). A subject with a missing or
non-finite vector, or without its batch or a preserved covariate, is left out
of the fit and of the harmonised table (counted in the summary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa

from cohort.errors import StatsInputError
from cohort.stats.adjusted.combat import ComBatModel, Term, combat_fit
from cohort.stats.adjusted.covariates import SubjectTable
from cohort.stats.common import FloatArray, IntArray
from cohort.stats.tables import FeatureKeys, check_unique, subject_cohorts, vector_matrix

__all__ = ["Harmonised", "feature_matrix", "harmonise_features", "variance_share"]


@dataclass(frozen=True)
class Pooled:
    """The pooled subjects x features matrix of a features table."""

    ids: npt.NDArray[np.object_]  # sorted
    cohorts: npt.NDArray[np.object_]
    matrix: FloatArray  # NaN where a subject lacks a vector
    layers: list[str]  # per feature
    regions: list[str]
    channels: list[int]
    blocks: list[tuple[str, str, int, int]]  # (layer, region, first column, channels)


def feature_matrix(features: pd.DataFrame) -> Pooled:
    """Every subject's vectors side by side, layer by layer and region by region."""
    check_unique(features, ["subject_id", "region", "layer"], "features")
    subject_cohorts(features)
    keys = FeatureKeys(features)
    order = np.argsort(keys.subjects, kind="stable")
    parts: list[FloatArray] = []
    layers: list[str] = []
    regions: list[str] = []
    channels: list[int] = []
    blocks: list[tuple[str, str, int, int]] = []
    start = 0
    for layer in keys.layers:
        rows = keys.layer_rows(layer)
        matrix = vector_matrix(features["vector"].iloc[rows], layer)
        where = keys.where(rows)
        for code, region in enumerate(keys.regions):
            at = where[order, code]
            if not (at >= 0).any():
                continue
            block = np.full((order.size, matrix.shape[1]), np.nan)
            block[at >= 0] = matrix[at[at >= 0]]
            parts.append(block)
            width = matrix.shape[1]
            blocks.append((layer, region, start, width))
            layers += [layer] * width
            regions += [region] * width
            channels += list(range(width))
            start += width
    matrix = np.hstack(parts) if parts else np.zeros((order.size, 0))
    return Pooled(
        keys.subjects[order], keys.cohorts[order], matrix, layers, regions, channels, blocks
    )


def variance_share(matrix: FloatArray, codes: IntArray) -> float:
    """Mean over features of the share of variance the groups ``codes`` explain (one-way
    R²); how much of each feature a site (or cohort) accounts for."""
    mean = matrix.mean(axis=0)
    total = ((matrix - mean) ** 2).sum(axis=0)
    between = np.zeros(matrix.shape[1])
    for code in np.unique(codes):
        part = matrix[codes == code]
        between += part.shape[0] * (part.mean(axis=0) - mean) ** 2
    share = np.divide(between, total, out=np.zeros_like(total), where=total > 0)
    return float(share[total > 0].mean()) if (total > 0).any() else float("nan")


@dataclass(frozen=True)
class Harmonised:
    """The harmonised features table, the model, its per-feature keys and a summary."""

    features: pd.DataFrame
    model: ComBatModel
    keys: dict[str, list[Any]]
    summary: dict[str, Any]


def _terms(table: SubjectTable, rows: IntArray, cohorts: npt.NDArray[Any]) -> list[Term]:
    terms = [Term("cohort", "categorical", tuple(sorted(set(cohorts.tolist()))))]
    for cov in table.covariates:
        if cov.kind == "continuous":
            terms.append(Term(cov.name, "continuous"))
        else:
            codes = np.unique(table.column(cov.name, rows))
            terms.append(Term(cov.name, "categorical", tuple(cov.levels[int(c)] for c in codes)))
    return terms


def _values(
    table: SubjectTable, rows: IntArray, cohorts: npt.NDArray[Any], names: Sequence[str]
) -> dict[str, list[Any]]:
    values: dict[str, list[Any]] = {"cohort": [str(c) for c in cohorts]}
    for name in names:
        kind = table.kinds[name]
        column = table.column(name, rows)
        values[name] = (
            column.tolist() if kind.kind == "continuous" else [kind.levels[int(c)] for c in column]
        )
    return values


def harmonise_features(
    features: pd.DataFrame,
    table: SubjectTable,
    batch: str,
    model: ComBatModel | None = None,
) -> Harmonised:
    """ComBat-harmonise the vectors of ``features`` over the batches in column ``batch``.

    Fits a model (cohort and ``table``'s covariates preserved) unless ``model`` is
    given, which is then applied without refitting (its preserved terms must be
    columns of ``table``). Returns the features table of the harmonised subjects
    (same columns, rows in the same order, vectors float32) and a summary: the
    subjects fitted or left out, and the share of feature variance explained by the
    batch and by cohort before and after.
    """
    pooled = feature_matrix(features)
    rows = table.rows(pooled.ids)
    preserved = (
        [c.name for c in table.covariates]
        if model is None
        else [t.name for t in model.terms if t.name != "cohort"]
    )
    missing = [n for n in [batch, *preserved] if n not in table.kinds]
    if missing:
        raise StatsInputError(
            f"ComBat needs the column(s) {', '.join(missing)} for these subjects; name them "
            "with --covariates (or give them in the subjects table)"
        )
    usable = np.isfinite(pooled.matrix).all(axis=1) & table.complete(rows, [batch, *preserved])
    left_out = pooled.ids[~usable].tolist()
    ids, cohorts, matrix, rows = (
        pooled.ids[usable],
        pooled.cohorts[usable],
        pooled.matrix[usable],
        rows[usable],
    )
    kind = table.kinds[batch]
    batch_codes = table.column(batch, rows)
    batches = [kind.levels[int(c)] for c in batch_codes]
    values = _values(table, rows, cohorts, preserved)
    refit = model is None
    if model is None:
        model, harmonised = combat_fit(matrix, batches, _terms(table, rows, cohorts), values, batch)
    else:
        harmonised = model.apply(matrix, batches, values)
    cohort_codes = pd.factorize(pd.Series(cohorts))[0].astype(np.int64)
    site_codes = batch_codes.astype(np.int64)
    summary = {
        "batch": batch,
        "batches": list(model.batches),
        "model": "fitted on these subjects" if refit else "applied without refitting",
        "subjects": int(matrix.shape[0]),
        "left_out": {"count": len(left_out), "subjects": left_out[:50]},
        "features": int(matrix.shape[1]),
        "unchanged_features": int((~model.fitted).sum()),
        "batch_share_before": variance_share(matrix, site_codes),
        "batch_share_after": variance_share(harmonised, site_codes),
        "cohort_share_before": variance_share(matrix, cohort_codes),
        "cohort_share_after": variance_share(harmonised, cohort_codes),
    }
    return Harmonised(
        _table(features, pooled, ids, harmonised),
        model,
        {"layer": pooled.layers, "region": pooled.regions, "channel": pooled.channels},
        summary,
    )


def _table(
    features: pd.DataFrame, pooled: Pooled, ids: npt.NDArray[Any], harmonised: FloatArray
) -> pd.DataFrame:
    """``features``' rows of the subjects ``ids`` with their harmonised vectors."""
    position = {str(sid): i for i, sid in enumerate(ids)}
    where = {(layer, region): (start, width) for layer, region, start, width in pooled.blocks}
    subject = features["subject_id"].astype(str).to_numpy()
    layer = features["layer"].astype(str).to_numpy()
    region = features["region"].astype(str).to_numpy()
    keep = np.array([s in position for s in subject], dtype=bool)
    kept = features.loc[keep].reset_index(drop=True)
    vectors: list[npt.NDArray[np.float32]] = []
    for s, lay, reg in zip(subject[keep], layer[keep], region[keep], strict=True):
        start, width = where[(lay, reg)]
        vectors.append(harmonised[position[s], start : start + width].astype(np.float32))
    flat = np.concatenate(vectors) if vectors else np.zeros(0, dtype=np.float32)
    offsets = np.cumsum([0, *(v.size for v in vectors)]).astype(np.int32)
    kept["vector"] = pd.arrays.ArrowExtensionArray(
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    )
    return kept
