"""Every subject of a run, done or failed, with robust outliers marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import pandas as pd

from cohort.report.results import Results

__all__ = ["OUTLIER_Z", "robust_outliers", "subjects_table"]

OUTLIER_Z: Final = 3.5  # robust z (median / MAD) beyond which a cosine marks an outlier


def robust_outliers(similarity: pd.DataFrame, threshold: float = OUTLIER_Z) -> pd.DataFrame:
    """Cosines far from their cohort's median: robust z = 0.6745 (x - median) / MAD.

    Per cohort x layer x pair (Iglewicz & Hoaglin's modified z-score); rows
    with ``|z| > threshold``: subject_id, cohort, layer, pair, cosine, z. Groups
    with a MAD of 0 are left out.
    """
    columns = ["subject_id", "cohort", "layer", "pair", "cosine", "z"]
    if similarity.empty:
        return pd.DataFrame(columns=columns)
    frame = similarity.assign(pair=similarity["region_a"] + "-" + similarity["region_b"])
    keys = ["cohort", "layer", "pair"]
    median = frame.groupby(keys)["cosine"].transform("median")
    mad = (frame["cosine"] - median).abs().groupby([frame[k] for k in keys]).transform("median")
    with np.errstate(divide="ignore", invalid="ignore"):
        z = 0.6745 * (frame["cosine"] - median) / mad
    frame = frame.assign(z=z)
    hits = frame[np.isfinite(frame["z"]) & (frame["z"].abs() > threshold)]
    return hits[columns].reset_index(drop=True)


def subjects_table(results: Results, manifest_order: Sequence[str]) -> pd.DataFrame:
    """Every subject of the run: done (in the features) and failed (in the errors)."""
    done = results.features[["subject_id", "cohort"]].astype(str).drop_duplicates("subject_id")
    failed = results.errors.astype({"subject_id": str, "cohort": str})
    rows: dict[str, dict[str, str]] = {}
    voxels: dict[str, str] = {}
    if len(results.features):
        first_layer = str(results.features["layer"].iloc[0])
        rows_of_layer = results.features[results.features["layer"].astype(str) == first_layer]
        for sid, group in rows_of_layer.groupby(rows_of_layer["subject_id"].astype(str)):
            voxels[str(sid)] = ", ".join(
                f"{r} {int(v):,}" for r, v in zip(group["region"], group["voxels"], strict=True)
            )
    outliers = robust_outliers(results.similarity)
    notes: dict[str, list[str]] = {}
    for _, o in outliers.iterrows():
        notes.setdefault(str(o["subject_id"]), []).append(
            f"{o['layer']} {o['pair']} (z = {float(o['z']):+.1f})"
        )
    for sid, cohort in zip(done["subject_id"], done["cohort"], strict=True):
        rows[sid] = {
            "subject_id": sid,
            "cohort": cohort,
            "status": "done",
            "detail": voxels.get(sid, ""),
            "outlier": "; ".join(notes.get(sid, [])),
        }
    for _, e in failed.iterrows():
        sid = str(e["subject_id"])
        rows[sid] = {
            "subject_id": sid,
            "cohort": str(e["cohort"]),
            "status": "failed",
            "detail": f"{e['stage']}: {e['error_type']}",
            "outlier": "",
        }
    order = {sid: i for i, sid in enumerate(manifest_order)}
    ids = sorted(rows, key=lambda s: (order.get(s, len(order)), rows[s]["cohort"], s))
    return pd.DataFrame(
        [rows[s] for s in ids], columns=["subject_id", "cohort", "status", "detail", "outlier"]
    )
