"""Every table cohort writes or passes between stages: names and types, in one place.

The writers (:mod:`cohort.outputs.store`), the statistics (:mod:`cohort.stats`),
the report and the tests all take their columns from here, so a column is
added or renamed once. Each schema is a :class:`pyarrow.Schema`; ``*_COLUMNS``
are its names in order.

=========================  ====================================================
``FEATURES_SCHEMA``        ``features.parquet``: subject x region x layer
``SIMILARITY_SCHEMA``      ``similarity.parquet``: subject x layer x region pair
``ERRORS_SCHEMA``          ``errors.parquet`` / ``.csv``: one failed subject
``TESTS_SCHEMA``           ``stats.parquet`` / ``.csv``: one statistical test
``SUMMARY_SCHEMA``         cohort x layer x pair summaries (the report)
``FLAGS_SCHEMA``           one suspicious value (sanity flags)
=========================  ====================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "ERRORS_COLUMNS",
    "ERRORS_SCHEMA",
    "FEATURES_COLUMNS",
    "FEATURES_SCHEMA",
    "FLAGS_COLUMNS",
    "FLAGS_SCHEMA",
    "SIMILARITY_COLUMNS",
    "SIMILARITY_REQUIRED",
    "SIMILARITY_SCHEMA",
    "SUMMARY_COLUMNS",
    "SUMMARY_SCHEMA",
    "TESTS_COLUMNS",
    "TESTS_SCHEMA",
    "empty_frame",
    "pair_label",
    "typed_frame",
]

FEATURES_SCHEMA: Final = pa.schema(
    [
        ("subject_id", pa.string()),
        ("cohort", pa.string()),
        ("region", pa.string()),
        ("layer", pa.string()),  # stable id: "conv-1" or a module path
        ("layer_name", pa.string()),  # module path
        ("channels", pa.int32()),
        ("voxels", pa.int64()),  # region voxels on the model's input grid
        ("vector", pa.list_(pa.float32())),
    ]
)
SIMILARITY_SCHEMA: Final = pa.schema(
    [
        ("subject_id", pa.string()),
        ("cohort", pa.string()),
        ("layer", pa.string()),
        ("region_a", pa.string()),
        ("region_b", pa.string()),
        ("cosine", pa.float64()),  # of the pooled vectors as they are (the origin study's)
        ("cosine_centred", pa.float64()),  # after subtracting the run's mean vector per layer
    ]
)
ERRORS_SCHEMA: Final = pa.schema(
    [
        ("subject_id", pa.string()),
        ("cohort", pa.string()),
        ("stage", pa.string()),  # load, check, preprocess, extract or pipeline
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("image", pa.string()),
        ("mask", pa.string()),
    ]
)
TESTS_SCHEMA: Final = pa.schema(
    [
        ("family", pa.string()),
        ("cohort", pa.string()),  # one cohort, or the cohorts compared joined by "|"
        ("layer", pa.string()),  # one layer, or the layers compared joined by "|"
        ("pair", pa.string()),  # a region pair "a-b", two pairs "a-b|c-d", or a region
        ("test", pa.string()),
        ("n", pa.int64()),
        ("statistic", pa.float64()),
        ("p_value", pa.float64()),
        ("q_value", pa.float64()),  # Benjamini-Hochberg within the family
        ("q_value_run", pa.float64()),  # Benjamini-Hochberg over every test that ran
        ("effect_size", pa.float64()),
        ("effect_name", pa.string()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("status", pa.string()),  # "ok" or "skipped"
        ("reason", pa.string()),
        ("flag", pa.string()),
    ]
)
SUMMARY_SCHEMA: Final = pa.schema(
    [
        ("cohort", pa.string()),
        ("layer", pa.string()),
        ("region_a", pa.string()),
        ("region_b", pa.string()),
        ("pair", pa.string()),
        ("n", pa.int64()),
        ("n_nan", pa.int64()),
        ("mean", pa.float64()),
        ("sd", pa.float64()),
        ("median", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
    ]
)
FLAGS_SCHEMA: Final = pa.schema(
    [
        ("flag", pa.string()),
        ("subject_id", pa.string()),
        ("cohort", pa.string()),
        ("layer", pa.string()),
        ("region", pa.string()),
        ("detail", pa.string()),
    ]
)

FEATURES_COLUMNS: Final = tuple(FEATURES_SCHEMA.names)
SIMILARITY_COLUMNS: Final = tuple(SIMILARITY_SCHEMA.names)
# what the statistics need of a similarity table (cosine_centred only for centred statistics)
SIMILARITY_REQUIRED: Final = tuple(n for n in SIMILARITY_COLUMNS if n != "cosine_centred")
ERRORS_COLUMNS: Final = tuple(ERRORS_SCHEMA.names)
TESTS_COLUMNS: Final = tuple(TESTS_SCHEMA.names)
SUMMARY_COLUMNS: Final = tuple(SUMMARY_SCHEMA.names)
FLAGS_COLUMNS: Final = tuple(FLAGS_SCHEMA.names)


def pair_label(a: str, b: str) -> str:
    """The name of a region pair in tables and reports: ``"tibia-femur"``."""
    return f"{a}-{b}"


def _pandas_dtype(kind: pa.DataType) -> Any:
    if pa.types.is_integer(kind):
        return np.int64
    if pa.types.is_floating(kind):
        return np.float64
    if pa.types.is_string(kind):
        return str
    return object


def typed_frame(records: Sequence[Mapping[Any, Any]], schema: pa.Schema) -> pd.DataFrame:
    """Records as a frame with ``schema``'s columns in order and pandas dtypes to match.

    Strings become ``object`` columns of ``str``, integers ``int64``, floats
    ``float64``; other types (lists) are kept as they are.
    """
    table = pd.DataFrame.from_records(list(records), columns=list(schema.names))
    for name, kind in zip(schema.names, schema.types, strict=True):
        dtype = _pandas_dtype(kind)
        if dtype is not object:
            table[name] = table[name].astype(dtype)
    return table.reset_index(drop=True)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """A frame with no rows and ``schema``'s columns and dtypes."""
    return typed_frame([], schema)
