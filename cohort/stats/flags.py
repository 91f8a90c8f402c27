"""Sanity flags: values that are legal but suspicious (a cosine of exactly 1, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from cohort.outputs.schemas import FEATURES_COLUMNS, FLAGS_COLUMNS, SIMILARITY_REQUIRED
from cohort.stats.common import IntArray
from cohort.stats.tables import FeatureKeys, check_unique, require_columns, stored_matrix

BoolArray = npt.NDArray[np.bool_]

__all__ = [
    "FLAG_BELOW_MIN_N",
    "FLAG_COSINE_ONE",
    "FLAG_IDENTICAL_LAYERS",
    "FLAG_NAN_COSINE",
    "FLAG_NON_FINITE",
    "FLAG_ZERO_NORM",
    "Flag",
    "collect_flags",
    "sanity_flags",
]

# Sanity flag names (the ``flag`` column of sanity_flags and of the tests table).
FLAG_COSINE_ONE: Final = "cosine-one"  # a cosine of exactly 1.0
FLAG_NAN_COSINE: Final = "nan-cosine"  # a missing (NaN) cosine
FLAG_ZERO_NORM: Final = "zero-norm"  # a vector whose norm is 0
FLAG_NON_FINITE: Final = "non-finite"  # a vector holding NaN or inf
FLAG_IDENTICAL_LAYERS: Final = "identical-layers"  # two layers, same vector, same subject+region
FLAG_BELOW_MIN_N: Final = "below-min-n"  # a group smaller than cfg.min_n (test skipped)


@dataclass(frozen=True)
class Flag:
    name: str
    subject_id: str
    cohort: str
    layers: tuple[str, ...]
    region: str  # region name, or "a-b" for a pair
    pair: tuple[str, str] | None  # set for flags on a cosine
    detail: str


def collect_flags(features: pd.DataFrame, similarity: pd.DataFrame) -> list[Flag]:
    """Every sanity flag of the two tables (see :func:`sanity_flags`), in no fixed order.

    Vectorised per layer: the work is a few passes over each layer's matrix,
    and Python only touches the flagged rows.
    """
    out: list[Flag] = []
    if not features.empty:
        require_columns(features, FEATURES_COLUMNS, "features")
        check_unique(features, ["subject_id", "region", "layer"], "features")
        keys = FeatureKeys(features)
        blocks: list[
            tuple[str, IntArray, IntArray, npt.NDArray[np.unsignedinteger[Any]], BoolArray]
        ] = []
        for layer in keys.layers:
            rows = keys.layer_rows(layer)
            matrix = stored_matrix(features["vector"].iloc[rows], layer)
            finite: BoolArray = np.asarray(np.isfinite(matrix).all(axis=1))
            safe = np.where(finite[:, None], matrix, 0.0)
            zero = finite & ~(safe != 0).any(axis=1)
            for i in np.flatnonzero(~finite | zero):
                name = FLAG_ZERO_NORM if zero[i] else FLAG_NON_FINITE
                detail = "vector norm is 0" if zero[i] else "vector holds NaN or inf"
                subject, region = keys.subject[rows[i]], keys.region[rows[i]]
                out.append(
                    Flag(
                        name,
                        str(keys.subjects[subject]),
                        str(keys.cohorts[subject]),
                        (layer,),
                        keys.regions[region],
                        None,
                        detail,
                    )
                )
            usable = finite & ~zero & (matrix.shape[1] > 0)
            bits = matrix.view(f"u{matrix.itemsize}")  # float32 bits match iff float64 ones do
            blocks.append((layer, rows, keys.where(rows), bits, usable))
        out += _identical_layers(keys, blocks)
    if not similarity.empty:
        require_columns(similarity, SIMILARITY_REQUIRED, "similarity")
        cos = similarity["cosine"].to_numpy(dtype=np.float64)
        hits = np.flatnonzero(np.isnan(cos) | (cos == 1.0))
        rows_hit = similarity.iloc[hits]
        for subject, cohort, layer, a, b, value in zip(
            rows_hit["subject_id"].astype(str),
            rows_hit["cohort"].astype(str),
            rows_hit["layer"].astype(str),
            rows_hit["region_a"].astype(str),
            rows_hit["region_b"].astype(str),
            cos[hits],
            strict=True,
        ):
            one = bool(value == 1.0)
            out.append(
                Flag(
                    FLAG_COSINE_ONE if one else FLAG_NAN_COSINE,
                    subject,
                    cohort,
                    (layer,),
                    f"{a}-{b}",
                    (a, b),
                    "cosine is exactly 1.0 (identical directions)"
                    if one
                    else "cosine is NaN (missing or zero-norm vector)",
                )
            )
    return out


def _identical_layers(
    keys: FeatureKeys,
    blocks: list[tuple[str, IntArray, IntArray, npt.NDArray[np.unsignedinteger[Any]], BoolArray]],
) -> list[Flag]:
    """``identical-layers``: a subject and region whose vector at a layer has the bytes
    (as float64) of its vector at an earlier layer; the flag names the earliest such
    layer. Vectors that are empty, non-finite or all zero are left out."""
    out: list[Flag] = []
    for k, (layer, _, where_k, bits_k, usable_k) in enumerate(blocks):
        first = np.full(where_k.shape, -1, dtype=np.int64)
        for j, (_, _, where_j, bits_j, usable_j) in enumerate(blocks[:k]):
            if bits_j.shape[1] != bits_k.shape[1]:
                continue
            subject, region = np.nonzero((where_j >= 0) & (where_k >= 0) & (first < 0))
            row_j, row_k = where_j[subject, region], where_k[subject, region]
            same = usable_j[row_j] & usable_k[row_k]
            same &= (bits_j[row_j] == bits_k[row_k]).all(axis=1)
            first[subject[same], region[same]] = j
        for subject, region in zip(*np.nonzero(first >= 0), strict=True):
            earlier = blocks[int(first[subject, region])][0]
            out.append(
                Flag(
                    FLAG_IDENTICAL_LAYERS,
                    str(keys.subjects[subject]),
                    str(keys.cohorts[subject]),
                    (earlier, layer),
                    keys.regions[region],
                    None,
                    f"layers {earlier} and {layer} give identical vectors; check the hooks",
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
    records = collect_flags(features, similarity)
    table = pd.DataFrame(
        {
            "flag": [f.name for f in records],
            "subject_id": [f.subject_id for f in records],
            "cohort": [f.cohort for f in records],
            "layer": ["|".join(f.layers) for f in records],
            "region": [f.region for f in records],
            "detail": [f.detail for f in records],
        },
        columns=list(FLAGS_COLUMNS),
    ).astype(str)
    return table.sort_values(list(FLAGS_COLUMNS[:5]), kind="stable").reset_index(drop=True)
