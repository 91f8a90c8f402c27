"""Sanity flags: values that are legal but suspicious (a cosine of exactly 1, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from cohort.outputs.schemas import FEATURES_COLUMNS, FLAGS_COLUMNS, SIMILARITY_COLUMNS
from cohort.stats.tables import layer_matrix, require_columns, unique_in_order

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
    out: list[Flag] = []
    if not features.empty:
        require_columns(features, FEATURES_COLUMNS, "features")
        for layer in unique_in_order(features["layer"]):
            rows = features[features["layer"].astype(str) == layer].reset_index(drop=True)
            matrix = layer_matrix(rows, layer)
            finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(matrix).all(axis=1))
            safe = np.where(finite[:, None], matrix, 0.0)
            zero = finite & ~(safe != 0).any(axis=1)
            for i in np.flatnonzero(~finite | zero):
                name = FLAG_ZERO_NORM if zero[i] else FLAG_NON_FINITE
                detail = "vector norm is 0" if zero[i] else "vector holds NaN or inf"
                out.append(
                    Flag(
                        name,
                        str(rows.at[i, "subject_id"]),
                        str(rows.at[i, "cohort"]),
                        (layer,),
                        str(rows.at[i, "region"]),
                        None,
                        detail,
                    )
                )
        layers = unique_in_order(features["layer"])
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
                        Flag(
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
        require_columns(similarity, SIMILARITY_COLUMNS, "similarity")
        cos = similarity["cosine"].to_numpy(dtype=np.float64)
        for i in np.flatnonzero(np.isnan(cos) | (cos == 1.0)):
            row = similarity.iloc[i]
            pair = (str(row["region_a"]), str(row["region_b"]))
            one = bool(cos[i] == 1.0)
            out.append(
                Flag(
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
