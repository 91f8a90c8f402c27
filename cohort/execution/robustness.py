"""``cohort robustness``: every subject and K perturbed versions of it, through the run's
own pipeline, then the ICC of every cosine and channel.

::

    manifest subject s --> units s, "s (perturbation 1)", ..., "s (perturbation K)"
        --> the driver (:func:`cohort.execution.driver.run`): the same loaders (which
            apply the perturbation to the loaded pair, :func:`cohort.execution.load.perturbed`),
            the same feature actors, a part file and a resume key per unit
        --> :meth:`Robustness.finish`: robustness_similarity.parquet, robustness.parquet/.csv,
            robustness_channels.parquet/.csv, robustness_errors.parquet/.csv, and the usual
            outputs of the originals (perturbation 0 is the subject as ``cohort run`` sees it,
            with the same resume key, so a folder of an earlier ``cohort run`` is reused)

A unit's resume key adds its perturbation spec (index, seed, chain, settings) to
the subject's; the parameters a finished unit applied are kept beside its part
(``.cohort/perturbations/``), so a resumed run reports them too. A perturbation
that fails (a region shrunk to nothing) is an error row of that (subject,
perturbation); the subject then leaves the ICCs, which say how many entered.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pandas as pd
import pyarrow as pa

from cohort import stats
from cohort.config import RunConfig
from cohort.errors import ManifestError
from cohort.execution.load import DONE, FAILED
from cohort.execution.robust_tables import ROBUSTNESS_FILE, channel_rows, icc_rows
from cohort.inputs.chain import applied_defaults
from cohort.inputs.chain_config import RobustnessConfig
from cohort.outputs import schemas, store

if TYPE_CHECKING:
    from cohort.execution.units import Finished
    from cohort.inputs.manifest import Subject

__all__ = ["ROBUSTNESS_FILES", "Robustness", "unit_id"]

ROBUSTNESS_FILES: Final = (
    "robustness_similarity.parquet",
    ROBUSTNESS_FILE,
    "robustness.csv",
    "robustness_channels.parquet",
    "robustness_channels.csv",
    "robustness_errors.parquet",
    "robustness_errors.csv",
)


def unit_id(subject_id: str, index: int) -> str:
    """The id of perturbation ``index`` of a subject (0: the subject's own id)."""
    return subject_id if index == 0 else f"{subject_id} (perturbation {index})"


class Robustness:
    """The :class:`~cohort.execution.units.Work` of ``cohort robustness``."""

    def __init__(self, cfg: RobustnessConfig, out_dir: Path) -> None:
        self.cfg = cfg
        self.root = Path(out_dir) / store.STATE_DIR / "perturbations"
        self.out_dir = Path(out_dir)
        self.index: dict[str, tuple[str, int]] = {}  # unit id -> (subject id, perturbation)
        self.status: dict[str, str] = {}  # unit id -> done, cached or failed
        self.keys: dict[str, str] = {}  # unit id -> resume key (done or cached units)
        self.applied: dict[str, str] = {}  # unit id -> the parameters it applied (JSON)
        self.counts = {"units": 0, "done": 0, "cached": 0, "failed": 0}

    # ---------------------------------------------------------------- the units

    def units(
        self, subjects: tuple[Subject, ...], cfg: RunConfig
    ) -> tuple[tuple[Subject, ...], list[dict[str, Any]]]:
        from cohort.execution.plan import stream_rows

        ids = {s.subject_id for s in subjects}
        units: list[Subject] = []
        rows: list[dict[str, Any]] = []
        for s, row in zip(subjects, stream_rows(subjects, cfg), strict=True):
            for k in range(self.cfg.perturb.count + 1):
                uid = unit_id(s.subject_id, k)
                if k and uid in ids:
                    raise ManifestError(
                        f"the manifest has a subject {uid!r}, which is how cohort robustness "
                        f"names perturbation {k} of subject {s.subject_id!r}; rename one of them"
                    )
                self.index[uid] = (s.subject_id, k)
                units.append(dataclasses.replace(s, subject_id=uid))
                rows.append(
                    {
                        **row,
                        "subject_id": uid,
                        "subject": s.subject_id,  # the id the perturbation's draws are seeded by
                        "perturbation": self.cfg.perturb.spec(k) if k else "",
                    }
                )
        self.counts["units"] = len(units)
        return tuple(units), rows

    def note(self, row: Mapping[str, Any]) -> None:
        uid, status = str(row["subject_id"]), str(row["status"])
        self.status[uid] = status if status in (DONE, FAILED) else "cached"
        self.counts[self.status[uid]] += 1
        if status == FAILED:
            return
        key = str(row["key"])
        self.keys[uid] = key
        if status == DONE and self.index[uid][1] > 0:
            text = str(row["perturbation"])
            self.applied[uid] = text
            path = self._sidecar(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.atomic_path(path)
            tmp.write_text(text)
            tmp.replace(path)
        elif self.index[uid][1] > 0 and self._sidecar(key).is_file():
            self.applied[uid] = self._sidecar(key).read_text()

    def _sidecar(self, key: str) -> Path:
        return self.root / store.Parts.shard(key) / f"{key}.json"

    # ------------------------------------------------------------------ the end

    def finish(self, done: Finished) -> pd.DataFrame:
        from cohort.execution.reduce import read_features

        out_dir, keys, errors = Path(done.out_dir), done.keys, done.errors
        unit_of = {key: uid for uid, key in self.keys.items()}
        units = [unit_of[key] for key in keys]
        count, threshold = self.cfg.perturb.count, self.cfg.threshold
        record = {
            "perturbations": dataclasses.asdict(self.cfg.perturb),
            "threshold": threshold,
            "level": self.cfg.level,
            "counts": dict(self.counts),
            "files": list(ROBUSTNESS_FILES),
        }
        stamp = {**done.provenance, "robustness": record}

        combined = out_dir / store.STATE_DIR / "robustness-features.parquet"
        features_schema = store.with_provenance(schemas.FEATURES_SCHEMA, stamp)
        done.parts.combine(keys, features_schema, combined, cohorts=done.cohorts)
        features = read_features(combined)
        similarity = stats.cosine_table(features).drop(columns="cosine_centred")
        similarity = self._label(similarity).merge(self._parameters(units), on="unit", how="left")
        features = self._label(features)
        combined.unlink()
        similarity = similarity[list(schemas.ROBUSTNESS_SIMILARITY_SCHEMA.names)]
        self._write(
            similarity, "robustness_similarity", schemas.ROBUSTNESS_SIMILARITY_SCHEMA, stamp
        )
        level = self.cfg.level
        iccs = icc_rows(similarity, count, threshold, level)
        self._write(iccs, "robustness", schemas.ROBUSTNESS_SCHEMA, stamp, csv=True)
        channels = channel_rows(features, count, threshold, level)
        schema = schemas.ROBUSTNESS_CHANNELS_SCHEMA
        self._write(channels, "robustness_channels", schema, stamp, csv=True)
        failed = [
            {**e, "subject_id": self.index[e["subject_id"]][0], "perturbation": k}
            for e in errors
            for k in [self.index[e["subject_id"]][1]]
        ]
        frame = schemas.typed_frame(failed, schemas.ROBUSTNESS_ERRORS_SCHEMA)
        self._write(frame, "robustness_errors", schemas.ROBUSTNESS_ERRORS_SCHEMA, stamp, csv=True)

        # the originals: the usual outputs, as cohort run writes them (run.json last)
        original = [i for i, uid in enumerate(units) if self.index[uid][1] == 0]
        first = [dict(e) for e, f in zip(errors, failed, strict=True) if f["perturbation"] == 0]
        states = [state for uid, state in self.status.items() if self.index[uid][1] == 0]
        stamp["counts"] = {
            "subjects": self.counts["units"] // (count + 1),
            **{state: states.count(state) for state in (DONE, "cached", FAILED)},
        }
        originals = dataclasses.replace(
            done,
            keys=[keys[i] for i in original],
            errors=first,
            provenance=stamp,
            cohorts=[done.cohorts[i] for i in original],
        )
        return originals.reduce()

    def _label(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (one ``subject_id`` per unit) with ``unit``, the subject's own id
        in ``subject_id`` and its ``perturbation``."""
        units = frame["subject_id"].astype(str)
        subject = {uid: s for uid, (s, _) in self.index.items()}
        index = {uid: k for uid, (_, k) in self.index.items()}
        return frame.assign(
            unit=units, subject_id=units.map(subject), perturbation=units.map(index).astype("int64")
        )

    def _parameters(self, units: Sequence[str]) -> pd.DataFrame:
        """The parameters each finished unit applied (perturbation 0: none), one row each."""
        chain = "+".join(c for c in self.cfg.perturb.chain)
        rows = []
        for uid in units:
            k = self.index[uid][1]
            if k == 0:
                values = applied_defaults(0, "")
            elif uid in self.applied:
                values = json.loads(self.applied[uid])
            else:  # a part of an earlier version, with no record beside it
                values = {
                    n: math.nan for n, v in applied_defaults().items() if isinstance(v, float)
                }
                values |= {"perturbation": k, "chain": chain, "rotation_axis": "?"}
                values |= {"region_voxels": "{}"}
            rows.append({**values, "unit": uid})
        frame = pd.DataFrame(rows, columns=[*schemas.PERTURBATION_SCHEMA.names, "unit"])
        return frame.drop(columns="perturbation")

    def _write(
        self,
        frame: pd.DataFrame,
        name: str,
        schema: pa.Schema,
        provenance: Mapping[str, Any],
        csv: bool = False,
    ) -> None:
        """``frame`` as ``<name>.parquet`` (and ``.csv``) in the output folder, atomically."""
        table = store.stamped(store.table(frame, schema), provenance)
        store.write_parquet(table, self.out_dir / f"{name}.parquet")
        if csv:
            store.write_csv(table.to_pandas(), self.out_dir / f"{name}.csv")
