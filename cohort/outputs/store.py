"""Parquet and CSV outputs: provenance metadata, per-subject parts and atomic writes.

Layout of an output folder::

    features.parquet  similarity.parquet  similarity.csv
    stats.parquet  stats.csv  errors.parquet  errors.csv  run.json
    .cohort/parts/<subject key>.parquet     one per finished subject (its features)
    .cohort/staging/                         final files before the move

A subject's key is its id plus a fingerprint of its input files' contents, its
label map and every option that changes its numbers
(:func:`cohort.inputs.fingerprint.options_identity`), so a rerun can tell a
finished subject from one whose inputs or options changed. Every file is
written to a temporary name (``.<name>.tmp-<pid>``) and renamed, so a reader (or
a rerun) never sees half a file; temporary files that a run which is no longer
alive left behind are removed by the next run, those of a live run are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cohort.errors import OutputError

__all__ = [
    "FINAL_FILES",
    "PROVENANCE_KEY",
    "STATE_DIR",
    "Parts",
    "atomic_path",
    "publish",
    "staging_dir",
    "stamped",
    "table",
    "with_provenance",
    "write_csv",
    "write_json",
    "write_parquet",
]

PROVENANCE_KEY = b"cohort.provenance"
STATE_DIR = ".cohort"
FINAL_FILES = (
    "features.parquet",
    "similarity.parquet",
    "similarity.csv",
    "stats.parquet",
    "stats.csv",
    "errors.parquet",
    "errors.csv",
    "run.json",
)


def with_provenance(schema: pa.Schema, provenance: Mapping[str, Any]) -> pa.Schema:
    """The schema with the run's provenance as JSON under ``cohort.provenance``."""
    return schema.with_metadata({PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)})


def stamped(table: pa.Table, provenance: Mapping[str, Any]) -> pa.Table:
    """``table`` with the run's provenance as its schema metadata (and no other)."""
    return table.replace_schema_metadata(with_provenance(table.schema, provenance).metadata)


_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


def atomic_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_parquet(table: pa.Table, path: Path) -> Path:
    tmp = atomic_path(path)
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    tmp = atomic_path(path)
    frame.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)
    return path


def write_json(data: Mapping[str, Any], path: Path) -> Path:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def table(frame: pd.DataFrame | Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts or a frame) as a table with exactly ``schema``'s columns and types."""
    if isinstance(frame, pd.DataFrame):
        return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    return pa.Table.from_pylist(list(frame), schema=schema)


# ------------------------------------------------------------------------ parts


class Parts:
    """Per-subject result files under ``<out>/.cohort/parts``: one Parquet file of
    features per finished subject, named by its key."""

    def __init__(self, out_dir: Path) -> None:
        self.root = Path(out_dir) / STATE_DIR / "parts"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.parquet"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, features: pa.Table) -> None:
        """Write one subject's features (under a temporary name, then renamed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_parquet(features, self.path(key))

    def keys(self) -> set[str]:
        """Keys of finished parts (temporary files of unfinished writes do not count)."""
        if not self.root.is_dir():
            return set()
        return {p.name.removesuffix(".parquet") for p in self.root.glob("[!.]*.parquet")}

    def clean(self) -> list[Path]:
        """Remove temporary files left by runs that are no longer alive; returns them."""
        if not self.root.is_dir():
            return []
        removed = []
        for path in self.root.iterdir():
            match = _TMP.match(path.name)
            if match and not _alive(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def combine(
        self,
        keys: Sequence[str],
        schema: pa.Schema,
        out: Path,
        *,
        cohorts: Sequence[str] | None = None,
    ) -> int:
        """Concatenate the parts of ``keys`` into ``out``, with ``schema``.

        ``cohorts``, one per key, replaces the parts' ``cohort`` column (a
        reused part keeps the numbers, the manifest decides the group).
        Streams part by part, so memory does not grow with the cohort. Returns
        the number of rows written.
        """
        if cohorts is not None and len(cohorts) != len(keys):
            raise OutputError(
                f"{len(cohorts)} cohorts for {len(keys)} parts; give one cohort per part"
            )
        tmp = atomic_path(out)
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for index, key in enumerate(keys):
                part = pq.read_table(self.path(key)).cast(pa.schema(list(schema), metadata=None))
                if cohorts is not None and "cohort" in part.column_names:
                    column = pa.array([cohorts[index]] * part.num_rows, pa.string())
                    part = part.set_column(part.column_names.index("cohort"), "cohort", column)
                writer.write_table(part.replace_schema_metadata(schema.metadata))
                rows += part.num_rows
        os.replace(tmp, out)
        return rows


def staging_dir(out_dir: Path) -> Path:
    path = Path(out_dir) / STATE_DIR / "staging"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(staging: Path, out_dir: Path, names: Sequence[str] = FINAL_FILES) -> None:
    """Move the staged files ``names`` into the output folder; run.json last, as the
    commit mark."""
    present = [name for name in names if (staging / name).exists()]
    for name in sorted(present, key=lambda n: n == "run.json"):
        os.replace(staging / name, Path(out_dir) / name)
