"""The reducer: per-subject parts in, the run's tables and statistics out.

:func:`finish` combines the part files of a run, computes the summaries and
tests and moves every output into place (``run.json`` last). :func:`restate`
recomputes the statistics of a finished run (``cohort stats``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cohort import stats
from cohort.config import RunConfig, StatsConfig
from cohort.outputs import schemas, store
from cohort.outputs.provenance import read_run

__all__ = ["SUMMARY_FILES", "finish", "read_features", "restate", "write_summaries"]

# What the statistics write; ``cohort stats`` replaces these and run.json.
SUMMARY_FILES = ("similarity.csv", "stats.parquet", "stats.csv")


def read_features(path: Path) -> pd.DataFrame:
    """``features.parquet`` as a frame whose ``vector`` column stays in Arrow.

    The column is a ``pd.ArrowDtype`` list: the vectors stay one flat buffer
    that :func:`cohort.stats.tables.vector_matrix` reshapes per layer,
    instead of one numpy array object per row (900,000 of them at 100,000
    subjects with 3 regions and 3 layers).
    """
    return pq.read_table(path).to_pandas(types_mapper=_arrow_lists)


def _arrow_lists(kind: pa.DataType) -> pd.ArrowDtype | None:
    return pd.ArrowDtype(kind) if pa.types.is_list(kind) else None


def finish(
    out_dir: Path,
    parts: store.Parts,
    keys: Sequence[str],
    errors: Sequence[Mapping[str, str]],
    cfg: RunConfig,
    provenance: Mapping[str, Any],
    *,
    cohorts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Combine parts, compute summaries and tests, and move every output into place.

    ``cohorts`` (one per key) is each subject's cohort in this run's manifest;
    it replaces the one stored in a reused part. Returns the origin study's
    table (what ``similarity.csv`` holds).
    """
    staging = store.staging_dir(out_dir)
    features_schema = store.with_provenance(schemas.FEATURES_SCHEMA, provenance)
    parts.combine(keys, features_schema, staging / "features.parquet", cohorts=cohorts)
    features = read_features(staging / "features.parquet")
    similarity = stats.cosine_table(features)
    store.write_parquet(
        store.stamped(store.table(similarity, schemas.SIMILARITY_SCHEMA), provenance),
        staging / "similarity.parquet",
    )
    error_table = store.stamped(store.table(list(errors), schemas.ERRORS_SCHEMA), provenance)
    store.write_parquet(error_table, staging / "errors.parquet")
    store.write_csv(error_table.to_pandas(), staging / "errors.csv")
    origin = write_summaries(features, similarity, staging, cfg.stats, provenance)
    store.write_json(provenance, staging / "run.json")
    store.publish(staging, out_dir)
    return origin


def write_summaries(
    features: pd.DataFrame,
    similarity: pd.DataFrame,
    target: Path,
    cfg: StatsConfig,
    provenance: Mapping[str, Any],
    *,
    robust: Path | None = None,
) -> pd.DataFrame:
    """Stats and the origin-study table (raw or centred cosines, as ``cfg`` says).

    Writes :data:`SUMMARY_FILES` into ``target``; returns the origin table,
    whose first column ``cosine`` says which cosines it holds. With ``robust``
    (a ``cohort robustness`` folder) the tests are those of the cosines it rates
    robust (:func:`cohort.execution.robust_tables.robust_tests`).
    """
    origin = stats.origin_table(stats.chosen_cosines(similarity, cfg.centre))
    origin.insert(0, "cosine", "centred" if cfg.centre else "raw")
    store.write_csv(origin, target / "similarity.csv")
    if robust is None:
        tests, schema = stats.run_tests(features, similarity, cfg), schemas.TESTS_SCHEMA
    else:
        from cohort.execution.robust_tables import read_robust, robust_tests

        found = read_robust(robust)
        tests = robust_tests(features, similarity, cfg, found, str(robust))
        schema = schemas.ROBUST_TESTS_SCHEMA
    store.write_parquet(
        store.stamped(store.table(tests, schema), provenance),
        target / "stats.parquet",
    )
    store.write_csv(tests, target / "stats.csv")
    return origin


def restate(folder: Path, cfg: StatsConfig, *, robust: Path | None = None) -> pd.DataFrame:
    """Recompute the statistics of the finished run in ``folder`` with ``cfg``.

    The new summaries and ``run.json`` (whose ``config.stats`` becomes
    ``cfg``, and ``robust_only`` the ``robust`` folder or null) are written to a
    staging folder and moved into place together, so ``run.json`` always states
    the settings ``stats.parquet`` was made with. With ``robust`` only the
    cosines that ``cohort robustness`` found robust there are tested. Returns the
    origin study's table.
    """
    folder = Path(folder)
    provenance = read_run(folder)
    provenance["config"] = {**provenance.get("config", {}), "stats": dataclasses.asdict(cfg)}
    provenance["robust_only"] = None if robust is None else str(Path(robust).resolve())
    staging = store.staging_dir(folder)
    features = read_features(folder / "features.parquet")
    similarity = pq.read_table(folder / "similarity.parquet").to_pandas()
    origin = write_summaries(features, similarity, staging, cfg, provenance, robust=robust)
    store.write_json(provenance, staging / "run.json")
    store.publish(staging, folder, names=(*SUMMARY_FILES, "run.json"))
    return origin
