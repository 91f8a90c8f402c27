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
from cohort.config import AdjustConfig, RunConfig, StatsConfig
from cohort.execution import adjust
from cohort.outputs import schemas, store
from cohort.outputs.provenance import read_run, saved_adjust_config
from cohort.stats.adjusted.covariates import SubjectTable

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
    columns: adjust.Columns | None = None,
) -> pd.DataFrame:
    """Combine parts, compute summaries and tests, and move every output into place.

    ``cohorts`` (one per key) is each subject's cohort in this run's manifest;
    it replaces the one stored in a reused part. ``columns``: the subjects'
    covariates, strata and batch (:mod:`cohort.execution.adjust`), for an adjusted
    run. Returns the origin study's table (what ``similarity.csv`` holds).
    """
    staging = store.staging_dir(out_dir)
    features_schema = store.with_provenance(schemas.FEATURES_SCHEMA, provenance)
    parts.combine(keys, features_schema, staging / "features.parquet", cohorts=cohorts)
    features = read_features(staging / "features.parquet")
    similarity = stats.cosine_table(features)
    prepared = adjust.prepare(
        features, similarity, cfg.adjust, columns, staging, provenance, check_constant=False
    )
    provenance = {**provenance, **prepared.provenance}
    _write_similarity(prepared, staging, provenance)
    error_table = store.stamped(store.table(list(errors), schemas.ERRORS_SCHEMA), provenance)
    store.write_parquet(error_table, staging / "errors.parquet")
    store.write_csv(error_table.to_pandas(), staging / "errors.csv")
    origin = write_summaries(
        prepared.features,
        prepared.tested,
        staging,
        cfg.stats,
        provenance,
        table=prepared.table,
        note=prepared.note,
        kind=prepared.kind,
    )
    store.write_json(provenance, staging / "run.json")
    store.publish(staging, out_dir, names=(*store.FINAL_FILES, *prepared.files))
    _remove_stale(out_dir, prepared.files)
    return origin


def _write_similarity(
    prepared: adjust.Prepared, target: Path, provenance: Mapping[str, Any]
) -> None:
    schema = schemas.SIMILARITY_HARMONISED_SCHEMA if prepared.kind else schemas.SIMILARITY_SCHEMA
    store.write_parquet(
        store.stamped(store.table(prepared.similarity, schema), provenance),
        target / "similarity.parquet",
    )


def _remove_stale(folder: Path, written: Sequence[str]) -> None:
    """Adjusted outputs of an earlier run or setting that this one did not write."""
    for name in adjust.ADJUST_FILES:
        if name not in written:
            (Path(folder) / name).unlink(missing_ok=True)


def write_summaries(
    features: pd.DataFrame,
    similarity: pd.DataFrame,
    target: Path,
    cfg: StatsConfig,
    provenance: Mapping[str, Any],
    *,
    table: SubjectTable | None = None,
    note: str = "",
    kind: str = "",
    robust: Path | None = None,
) -> pd.DataFrame:
    """Stats and the origin-study table (raw or centred cosines, as ``cfg`` says).

    Writes :data:`SUMMARY_FILES` into ``target``; returns the origin table,
    whose first column ``cosine`` says which cosines it holds (``raw``,
    ``centred``, or with ``kind`` = ``harmonised`` ``harmonised`` /
    ``harmonised-centred``). ``table`` and ``note``: see :func:`cohort.stats.run_tests`.
    With ``robust`` (a ``cohort robustness`` folder) the tests are those of the
    cosines it rates robust (:func:`cohort.execution.robust_tables.robust_tests`).
    """
    origin = stats.origin_table(stats.chosen_cosines(similarity, cfg.centre))
    label = "centred" if cfg.centre else "raw"
    if kind:
        label = f"{kind}-centred" if cfg.centre else kind
    origin.insert(0, "cosine", label)
    store.write_csv(origin, target / "similarity.csv")
    if robust is None:
        tests = stats.run_tests(features, similarity, cfg, table, note=note)
        schema = schemas.TESTS_SCHEMA
    else:
        from cohort.execution.robust_tables import read_robust, robust_tests

        found = read_robust(robust)
        tests = robust_tests(features, similarity, cfg, found, str(robust), table, note=note)
        schema = schemas.ROBUST_TESTS_SCHEMA
    store.write_parquet(
        store.stamped(store.table(tests, schema), provenance),
        target / "stats.parquet",
    )
    store.write_csv(tests, target / "stats.csv")
    return origin


def restate(
    folder: Path,
    cfg: StatsConfig,
    adjusted: AdjustConfig | None = None,
    *,
    robust: Path | None = None,
) -> pd.DataFrame:
    """Recompute the statistics of the finished run in ``folder`` with ``cfg``.

    ``adjusted``: the covariates, strata and harmonisation to use (default: the
    run's own, from run.json). The new summaries and ``run.json`` (whose
    ``config.stats`` and ``config.adjust`` become these) are written to a staging
    folder and moved into place together, so ``run.json`` always states the
    settings ``stats.parquet`` was made with. With ``robust`` (a ``cohort
    robustness`` folder, recorded as ``robust_only``) only the cosines it found
    robust are tested. Returns the origin study's table.
    """
    folder = Path(folder)
    provenance = read_run(folder)
    adjusted = adjusted if adjusted is not None else saved_adjust_config(provenance)
    provenance["config"] = {
        **provenance.get("config", {}),
        "stats": dataclasses.asdict(cfg),
        "adjust": dataclasses.asdict(adjusted),
    }
    provenance["robust_only"] = None if robust is None else str(Path(robust).resolve())
    for key in ("covariates", "harmonisation"):
        provenance.pop(key, None)
    staging = store.staging_dir(folder)
    features = read_features(folder / "features.parquet")
    similarity = pq.read_table(folder / "similarity.parquet").to_pandas()
    was_harmonised = "cosine_harmonised" in similarity.columns
    columns = adjust.folder_columns(folder, provenance, adjusted) if adjusted.active else None
    prepared = adjust.prepare(
        features, similarity, adjusted, columns, staging, provenance, check_constant=True
    )
    provenance.update(prepared.provenance)
    names = [*SUMMARY_FILES, *prepared.files]
    if prepared.kind or was_harmonised:
        _write_similarity(prepared, staging, provenance)
        names.append("similarity.parquet")
    origin = write_summaries(
        prepared.features,
        prepared.tested,
        staging,
        cfg,
        provenance,
        table=prepared.table,
        note=prepared.note,
        kind=prepared.kind,
        robust=robust,
    )
    store.write_json(provenance, staging / "run.json")
    store.publish(staging, folder, names=(*names, "run.json"))
    _remove_stale(folder, prepared.files)
    return origin
