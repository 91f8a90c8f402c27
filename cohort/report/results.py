"""Reading a finished run's folder into memory for the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cohort import stats
from cohort.config import StatsConfig
from cohort.errors import ReportError
from cohort.outputs import schemas
from cohort.outputs.provenance import read_run, saved_stats_config

__all__ = ["Results", "read_results"]


# --------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Results:
    """A result folder read into memory."""

    folder: Path
    run: dict[str, Any]  # run.json
    features: pd.DataFrame  # features.parquet (may be empty)
    similarity: pd.DataFrame  # ``cosine`` holds the cosines the tests used (raw or centred)
    tests: pd.DataFrame  # stats.parquet
    errors: pd.DataFrame  # errors.parquet
    stats_cfg: StatsConfig
    centred: bool  # cosines were computed after subtracting the pooled mean vector
    notes: tuple[str, ...] = ()  # files that were missing, said on the page

    @property
    def cohorts(self) -> list[str]:
        names = set(self.features["cohort"].astype(str)) | set(self.errors["cohort"].astype(str))
        return sorted(names)

    @property
    def done_cohorts(self) -> list[str]:
        return sorted(set(self.similarity["cohort"].astype(str)))

    @property
    def layers(self) -> list[str]:
        return [str(v) for v in pd.unique(self.similarity["layer"].astype(str))]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        pairs = zip(self.similarity["region_a"], self.similarity["region_b"], strict=True)
        return [(str(a), str(b)) for a, b in dict.fromkeys(pairs)]

    @property
    def regions(self) -> list[str]:
        return [str(v) for v in pd.unique(self.features["region"].astype(str))]


def _read_table(path: Path, columns: Sequence[str], notes: list[str]) -> pd.DataFrame:
    if not path.is_file():
        notes.append(f"{path.name} is missing from the result folder")
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    try:
        frame = pq.read_table(path).to_pandas()
    except Exception as err:
        raise ReportError(
            f"{path} cannot be read as Parquet ({err}); rerun `cohort stats` or the run"
        ) from None
    for column in columns:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    return frame


def read_results(folder: Path) -> Results:
    """Read a result folder; raises :class:`~cohort.errors.OutputError` when it is not one."""
    folder = Path(folder)
    run = read_run(folder)
    notes: list[str] = []
    features = _read_table(folder / "features.parquet", schemas.FEATURES_COLUMNS, notes)
    similarity = _read_table(folder / "similarity.parquet", schemas.SIMILARITY_COLUMNS, notes)
    tests = _read_table(folder / "stats.parquet", schemas.TESTS_COLUMNS, notes)
    errors = _read_table(folder / "errors.parquet", schemas.ERRORS_SCHEMA.names, notes)
    cfg = saved_stats_config(run)
    if "cosine_harmonised" in similarity.columns:  # the statistics used the harmonised ones
        similarity = similarity.assign(
            cosine=similarity["cosine_harmonised"],
            cosine_centred=similarity["cosine_harmonised_centred"],
        )
    similarity = stats.chosen_cosines(similarity, cfg.centre)
    similarity = similarity.assign(cosine=similarity["cosine"].astype(np.float64))
    return Results(folder, run, features, similarity, tests, errors, cfg, cfg.centre, tuple(notes))
