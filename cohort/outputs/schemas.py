"""Every table cohort writes or passes between stages: names and types, in one place.

The writers (:mod:`cohort.outputs.store`), the statistics (:mod:`cohort.stats`),
the report and the tests all take their columns from here, so a column is
added or renamed once. Each schema is a :class:`pyarrow.Schema`; ``*_COLUMNS``
are its names in order.

==================================  ====================================================
``FEATURES_SCHEMA``                 ``features.parquet``: subject x region x layer
``SIMILARITY_SCHEMA``               ``similarity.parquet``: subject x layer x region pair
``SIMILARITY_HARMONISED_SCHEMA``    the same with the harmonised cosines
``ERRORS_SCHEMA``                   ``errors.parquet`` / ``.csv``: one failed subject
``TESTS_SCHEMA``                    ``stats.parquet`` / ``.csv``: one statistical test
``SUMMARY_SCHEMA``                  cohort x layer x pair summaries (the report)
``FLAGS_SCHEMA``                    one suspicious value (sanity flags)
``ROBUSTNESS_*``                    ``cohort robustness``: cosines per perturbation, ICCs,
                                    channel summaries, errors; tests of ``--robust-only``
==================================  ====================================================
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
    "PERTURBATION_SCHEMA",
    "ROBUSTNESS_CHANNELS_SCHEMA",
    "ROBUSTNESS_ERRORS_SCHEMA",
    "ROBUSTNESS_SCHEMA",
    "ROBUSTNESS_SIMILARITY_SCHEMA",
    "ROBUST_TESTS_SCHEMA",
    "SIMILARITY_COLUMNS",
    "SIMILARITY_HARMONISED_SCHEMA",
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

_TYPES: Final = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "list<float32>": pa.list_(pa.float32()),
    "bool": pa.bool_(),
}


def _schema(*runs: str) -> pa.Schema:
    """A schema from runs of columns of one type, in order: ``"name name ...: type"``."""
    fields = []
    for run in runs:
        names, kind = run.rsplit(":", 1)
        fields += [pa.field(name, _TYPES[kind.strip()]) for name in names.split()]
    return pa.schema(fields)


# layer: a stable id, "conv-1" or a module path; layer_name: the module path;
# voxels: the region's voxels on the model's input grid.
FEATURES_SCHEMA: Final = _schema(
    "subject_id cohort region layer layer_name: string",
    "channels: int32",
    "voxels: int64",
    "vector: list<float32>",
)
# cosine: of the pooled vectors as they are (the origin study's); cosine_centred: after
# subtracting the run's mean vector per layer.
SIMILARITY_SCHEMA: Final = _schema(
    "subject_id cohort layer region_a region_b: string", "cosine cosine_centred: float64"
)
# with --harmonise / --harmonise-with: the cosines of the ComBat-harmonised vectors too
# (NaN for a subject left out of the harmonisation)
SIMILARITY_HARMONISED_SCHEMA: Final = _schema(
    "subject_id cohort layer region_a region_b: string",
    "cosine cosine_centred cosine_harmonised cosine_harmonised_centred: float64",
)
# stage: load, check, preprocess, extract or pipeline.
ERRORS_SCHEMA: Final = _schema("subject_id cohort stage error_type message image mask: string")
# cohort: one cohort, or the cohorts compared joined by "|"; layer: likewise for layers;
# pair: a region pair "a-b", two pairs "a-b|c-d", or a region; q_value: Benjamini-Hochberg
# within the family; q_value_run: Benjamini-Hochberg over every test that ran; status:
# "ok" or "skipped"; adjusted_for: "" for an unadjusted test, else the covariates joined by "+".
TESTS_SCHEMA: Final = _schema(
    "family cohort layer pair test adjusted_for: string",
    "n: int64",
    "statistic p_value q_value q_value_run effect_size: float64",
    "effect_name: string",
    "ci_low ci_high: float64",
    "status reason flag: string",
)
SUMMARY_SCHEMA: Final = _schema(
    "cohort layer region_a region_b pair: string",
    "n n_nan: int64",
    "mean sd median ci_low ci_high: float64",
)
FLAGS_SCHEMA: Final = _schema("flag subject_id cohort layer region detail: string")

# cohort robustness. The parameters a perturbation applied (cohort.inputs.chain): noise
# (the image's estimated level and the SD added, HU), the shift (RAS+ mm), the rotation
# (degrees about a unit axis "x,y,z" through the regions' centroid), the volume change
# (fraction), the contour band (mm) and each region's voxels before and after (JSON).
PERTURBATION_SCHEMA: Final = _schema(
    "perturbation: int64",
    "chain: string",
    "noise_level_hu noise_sd_hu shift_x_mm shift_y_mm shift_z_mm rotation_deg: float64",
    "rotation_axis: string",
    "volume_change contour_band_mm: float64",
    "region_voxels: string",
)
# every cosine of every perturbation (0 = the original) with the perturbation's parameters
ROBUSTNESS_SIMILARITY_SCHEMA: Final = pa.schema(
    [
        *_schema("subject_id cohort: string"),
        PERTURBATION_SCHEMA.field("perturbation"),
        *_schema("layer region_a region_b: string", "cosine: float64"),
        *(f for f in PERTURBATION_SCHEMA if f.name != "perturbation"),
    ]
)
# one row per cosine (layer x region pair): ICC(1,1) and its CI (icc, icc_low, icc_high),
# robust = icc_low >= threshold; ICC(2,1) and ICC(3,1) with theirs; n_subjects: subjects
# with every perturbation done (they entered), n_excluded: subjects left out.
ROBUSTNESS_SCHEMA: Final = _schema(
    "layer region_a region_b: string",
    "icc icc_low icc_high: float64",
    "icc_form: string",
    "n_subjects n_perturbations n_excluded: int64",
    "threshold: float64",
    "robust: bool",
    "icc_2_1 icc_2_1_low icc_2_1_high icc_3_1 icc_3_1_low icc_3_1_high: float64",
    "status reason: string",
)
# one row per layer x region: ICC(1,1) of every channel of the pooled vectors, summarised
ROBUSTNESS_CHANNELS_SCHEMA: Final = _schema(
    "layer region: string",
    "channels n_constant n_subjects n_perturbations: int64",
    "threshold share_robust share_robust_ci median_icc: float64",
    "status reason: string",
)
# an error row of one (subject, perturbation)
ROBUSTNESS_ERRORS_SCHEMA: Final = _schema(
    "subject_id cohort: string",
    "perturbation: int64",
    "stage error_type message image mask: string",
)
# stats.parquet of `cohort stats --robust-only`: the tests' columns, then what they kept
ROBUST_TESTS_SCHEMA: Final = TESTS_SCHEMA.append(pa.field("robust_only", pa.string()))

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
