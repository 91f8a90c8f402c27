"""Covariates, strata and harmonisation around the reducer: where the columns come from,
what is checked before a run, and the files an adjusted run writes.

Columns come from the manifest (the columns ``--covariates``, ``--strata`` and
``--harmonise`` name are allowed there), or from ``--subjects-table FILE``
(``subject_id`` plus the columns), which wins where both have a column. An
adjusted run writes, besides the usual files:

- ``covariates.parquet``: ``subject_id`` and the named columns as given (text), so
  ``cohort stats DIR`` reproduces the run without the manifest;
- with ``--harmonise`` / ``--harmonise-with``: ``features_harmonised.parquet`` (the
  features schema, ComBat-harmonised vectors), ``harmonisation.parquet`` (the fitted
  model, one row per feature; ``cohort stats NEW --harmonise-with OLD`` applies OLD's),
  and ``similarity.parquet`` gains ``cosine_harmonised`` and
  ``cosine_harmonised_centred``. The statistics then use the harmonised vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cohort import stats
from cohort.config import AdjustConfig
from cohort.errors import StatsInputError
from cohort.inputs.manifest import Subject, read_manifest, read_subjects_table
from cohort.outputs import schemas, store
from cohort.stats.adjusted.combat import ComBatModel
from cohort.stats.adjusted.covariates import SubjectTable, subject_table
from cohort.stats.adjusted.harmonise import harmonise_features

__all__ = [
    "ADJUST_FILES",
    "COVARIATES_FILE",
    "HARMONISED_FILE",
    "MODEL_FILE",
    "Columns",
    "Prepared",
    "check_run",
    "folder_columns",
    "manifest_columns",
    "manifest_extras",
    "prepare",
    "read_model",
]

COVARIATES_FILE: Final = "covariates.parquet"
HARMONISED_FILE: Final = "features_harmonised.parquet"
MODEL_FILE: Final = "harmonisation.parquet"
ADJUST_FILES: Final = (COVARIATES_FILE, HARMONISED_FILE, MODEL_FILE)


@dataclass(frozen=True)
class Columns:
    """Per-subject cells of the named columns, and where they came from."""

    ids: list[str]
    values: dict[str, list[str]]
    source: str


def read_model(folder: str | Path) -> ComBatModel:
    """The ComBat model a finished ``--harmonise`` run saved in ``folder``."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise StatsInputError(
            f"{path} is missing: --harmonise-with needs the folder of a run made with "
            "--harmonise (it saves the fitted model there)"
        )
    return ComBatModel.from_table(pq.read_table(path), str(path))


def _model_columns(cfg: AdjustConfig) -> tuple[str, ...]:
    """The columns a model applied with --harmonise-with needs: its batch and terms."""
    if cfg.harmonise_with is None:
        return ()
    model = read_model(cfg.harmonise_with)
    return (model.batch, *(t.name for t in model.terms if t.name != "cohort"))


def manifest_extras(cfg: AdjustConfig) -> tuple[str, ...]:
    """Columns the manifest may hold besides its own (what the run names)."""
    return tuple(dict.fromkeys([*cfg.columns(), *_model_columns(cfg)]))


def _with_table(columns: Columns, cfg: AdjustConfig) -> Columns:
    """``columns`` with those of ``cfg.subjects_table`` added (the table wins)."""
    if cfg.subjects_table is None:
        return columns
    ids, table = read_subjects_table(Path(cfg.subjects_table))
    position = {sid: i for i, sid in enumerate(ids)}
    values = dict(columns.values)
    for name, cells in table.items():
        values[name] = [cells[position[s]] if s in position else "" for s in columns.ids]
    return Columns(columns.ids, values, f"{columns.source} and subjects table {cfg.subjects_table}")


def manifest_columns(subjects: Sequence[Subject], manifest: Path, cfg: AdjustConfig) -> Columns:
    """The named columns of the manifest's subjects (and of the subjects table)."""
    ids = [s.subject_id for s in subjects]
    values: dict[str, list[str]] = {}
    for index, subject in enumerate(subjects):
        for name, cell in subject.covariates:
            values.setdefault(name, [""] * len(subjects))[index] = cell
    return _with_table(Columns(ids, values, f"manifest {manifest}"), cfg)


def folder_columns(folder: Path, run: Mapping[str, Any], cfg: AdjustConfig) -> Columns:
    """The named columns for ``cohort stats`` on a finished run: the subjects table when
    given, else the run's covariates.parquet when it holds them all, else the manifest
    run.json names."""
    wanted = manifest_extras(cfg)
    saved = Path(folder) / COVARIATES_FILE
    if cfg.subjects_table is None and saved.is_file():
        frame = pq.read_table(saved).to_pandas().astype(str)
        if all(name in frame.columns for name in wanted):
            values = {name: frame[name].tolist() for name in frame.columns if name != "subject_id"}
            return Columns(frame["subject_id"].tolist(), values, f"{saved}")
    manifest = run.get("manifest")
    if manifest and Path(str(manifest)).is_file():
        subjects = read_manifest(Path(str(manifest)), wanted)
        return manifest_columns(subjects, Path(str(manifest)), cfg)
    if cfg.subjects_table is not None:
        ids, table = read_subjects_table(Path(cfg.subjects_table))
        return Columns(ids, table, f"subjects table {cfg.subjects_table}")
    raise StatsInputError(
        f"the columns {', '.join(wanted)} are not in {saved} and the run's manifest "
        f"({manifest or 'not recorded'}) cannot be read; give them with --subjects-table FILE "
        "(subject_id plus the columns)"
    )


def check_run(subjects: Sequence[Subject], manifest: Path, cfg: AdjustConfig) -> None:
    """Before any subject is read: every named column present and typed, no missing value
    (unless --drop-incomplete), no constant covariate, no batch of one subject."""
    if not cfg.active:
        return
    columns = manifest_columns(subjects, manifest, cfg)
    table = subject_table(
        columns.ids, columns.values, cfg, columns.source, needed=_model_columns(cfg)
    )
    if cfg.harmonise is not None:
        codes = table.column(cfg.harmonise, table.rows(columns.ids))
        levels = table.kinds[cfg.harmonise].levels
        found, counts = np.unique(codes[codes >= 0], return_counts=True)
        small = [
            f"{levels[int(c)]} ({int(n)} subject)"
            for c, n in zip(found, counts, strict=True)
            if n < 2
        ]
        if small:
            raise StatsInputError(
                f"--harmonise {cfg.harmonise}: batch(es) with fewer than 2 subjects in "
                f"{columns.source}: {', '.join(small)}; a batch effect cannot be estimated from "
                "one subject: merge it with a similar batch in the column, or drop those subjects"
            )


@dataclass
class Prepared:
    """What the statistics of an adjusted run use, and what it adds to run.json."""

    features: pd.DataFrame  # the vectors the tests use (harmonised when harmonising)
    similarity: pd.DataFrame  # similarity.parquet as written (harmonised columns added)
    tested: pd.DataFrame  # the cosines the tests use, in cosine / cosine_centred
    table: SubjectTable | None = None
    note: str = ""
    kind: str = ""  # "" or "harmonised": which vectors the statistics use
    provenance: dict[str, Any] = field(default_factory=dict)
    files: tuple[str, ...] = ()  # files written into the staging folder


def prepare(
    features: pd.DataFrame,
    similarity: pd.DataFrame,
    cfg: AdjustConfig,
    columns: Columns | None,
    staging: Path,
    provenance: Mapping[str, Any],
    *,
    check_constant: bool,
) -> Prepared:
    """Type the columns, write covariates.parquet and, when harmonising, the harmonised
    features, the model and the harmonised cosines, into ``staging``."""
    similarity = similarity[list(schemas.SIMILARITY_COLUMNS)]
    if not cfg.active or columns is None:
        return Prepared(features, similarity, similarity)
    run_ids = sorted(set(features["subject_id"].astype(str)))
    table = subject_table(
        columns.ids,
        columns.values,
        cfg,
        columns.source,
        needed=_model_columns(cfg),
        run_ids=run_ids,
        check_constant=check_constant,
    )
    described = table.describe()
    frame = pd.DataFrame({"subject_id": columns.ids, **columns.values})
    store.write_parquet(
        store.stamped(pa.Table.from_pandas(frame.astype(str), preserve_index=False), provenance),
        staging / COVARIATES_FILE,
    )
    out = Prepared(features, similarity, similarity, table, provenance={"covariates": described})
    out.files = (COVARIATES_FILE,)
    if not cfg.harmonising:
        return out
    model = read_model(cfg.harmonise_with) if cfg.harmonise_with is not None else None
    batch = cfg.harmonise if cfg.harmonise is not None else model.batch if model else ""
    harmonised = harmonise_features(features, table, batch, model)
    store.write_parquet(
        store.stamped(store.table(harmonised.features, schemas.FEATURES_SCHEMA), provenance),
        staging / HARMONISED_FILE,
    )
    model_table = harmonised.model.to_table(harmonised.keys)
    stamp = store.with_provenance(model_table.schema, provenance).metadata
    metadata = {**(model_table.schema.metadata or {}), **stamp}
    store.write_parquet(model_table.replace_schema_metadata(metadata), staging / MODEL_FILE)
    cosines = stats.cosine_table(harmonised.features).rename(
        columns={"cosine": "cosine_harmonised", "cosine_centred": "cosine_harmonised_centred"}
    )
    keys = ["subject_id", "layer", "region_a", "region_b"]
    joined = similarity.merge(cosines.drop(columns="cohort"), on=keys, how="left")
    out.similarity = joined[list(schemas.SIMILARITY_HARMONISED_SCHEMA.names)]
    out.tested = similarity.assign(
        cosine=joined["cosine_harmonised"].to_numpy(),
        cosine_centred=joined["cosine_harmonised_centred"].to_numpy(),
    )
    out.features = harmonised.features
    out.note = f"vectors ComBat-harmonised over {batch}"
    out.kind = "harmonised"
    out.provenance["harmonisation"] = {
        **harmonised.summary,
        "applied_from": cfg.harmonise_with,
    }
    out.files = ADJUST_FILES
    return out
