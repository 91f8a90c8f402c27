"""The tables of ``cohort robustness``: ICCs per cosine and per channel, and the
tests of ``cohort stats --robust-only``.

Pure pandas/numpy on tables; the ICCs come from :func:`cohort.stats.icc.icc`.
A subject enters the ICCs when every one of its perturbations 1..K finished
(ICCs need a complete subjects x perturbations table); the original
(perturbation 0) is not one of the K measurements: it carries no noise and no
interpolation, so it would stand apart from every perturbed version the way
two real scans do not. Cohorts are pooled: the subjects of every cohort are
the ICC's targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cohort import stats
from cohort.config import StatsConfig
from cohort.errors import OutputError
from cohort.outputs.schemas import (
    ROBUST_TESTS_SCHEMA,
    ROBUSTNESS_CHANNELS_SCHEMA,
    ROBUSTNESS_SCHEMA,
    pair_label,
    typed_frame,
)
from cohort.stats.icc import FORMS, icc
from cohort.stats.tables import vector_matrix

if TYPE_CHECKING:
    from cohort.stats.adjusted.covariates import SubjectTable

__all__ = [
    "FEATURE_FAMILY",
    "ROBUSTNESS_FILE",
    "channel_rows",
    "complete_subjects",
    "icc_rows",
    "read_robust",
    "robust_tests",
]

ROBUSTNESS_FILE: Final = "robustness.parquet"
FEATURE_FAMILY: Final = "between-features"  # tests of vectors, not of cosines
_COSINE: Final = ["layer", "region_a", "region_b"]


def complete_subjects(table: pd.DataFrame, count: int) -> tuple[list[str], int]:
    """The subjects (sorted) whose perturbations 1..``count`` are all in ``table``
    (columns ``subject_id``, ``perturbation``), and how many others there are."""
    perturbed = table[table["perturbation"] >= 1]
    seen = perturbed.groupby("subject_id")["perturbation"].nunique()
    every = sorted(str(s) for s in seen.index[seen == count])
    others = set(table["subject_id"].astype(str)) - set(every)
    return every, len(others)


def icc_rows(
    similarity: pd.DataFrame, count: int, threshold: float, level: float = 0.95
) -> pd.DataFrame:
    """One row per cosine (layer x region pair) of ``similarity`` (``subject_id``,
    ``perturbation``, layer, region_a, region_b, ``cosine``): ICC(1,1), ICC(2,1) and
    ICC(3,1) over the complete subjects' perturbations 1..``count``, with their
    ``level`` CIs; ``robust`` when ICC(1,1)'s lower bound reaches ``threshold``
    (:data:`~cohort.outputs.schemas.ROBUSTNESS_SCHEMA`). A cosine with fewer than two
    subjects, or with a non-finite cosine, is ``skipped`` with the reason."""
    subjects, excluded = complete_subjects(similarity, count)
    cosines = list(dict.fromkeys(similarity[_COSINE].itertuples(index=False, name=None)))
    base = {
        "n_subjects": len(subjects),
        "n_perturbations": count,
        "n_excluded": excluded,
        "threshold": threshold,
        "icc_form": FORMS[0],
    }
    nan = float("nan")
    values: dict[str, Any] = {"icc": nan, "icc_low": nan, "icc_high": nan, "robust": False}
    for form in ("2_1", "3_1"):
        values |= {f"icc_{form}": nan, f"icc_{form}_low": nan, f"icc_{form}_high": nan}
    rows = [
        {**dict(zip(_COSINE, c, strict=True)), **base, **values, "status": "ok", "reason": ""}
        for c in cosines
    ]
    if len(subjects) < 2:
        why = f"{len(subjects)} subject(s) with all {count} perturbations done; an ICC needs 2"
        for row in rows:
            row.update(status="skipped", reason=why)
        return typed_frame(rows, ROBUSTNESS_SCHEMA)
    kept = similarity[similarity["subject_id"].isin(subjects) & (similarity["perturbation"] >= 1)]
    wide = kept.pivot_table(
        index=[*_COSINE, "subject_id"], columns="perturbation", values="cosine", aggfunc="first"
    )
    index = pd.MultiIndex.from_tuples(
        [(*c, s) for c in cosines for s in subjects], names=[*_COSINE, "subject_id"]
    )
    columns = list(range(1, count + 1))
    flat = wide.reindex(index=index, columns=columns).to_numpy(dtype=np.float64)
    data = flat.reshape(len(cosines), len(subjects), count)
    finite = np.isfinite(data).all(axis=(1, 2))
    if finite.any():
        forms = icc(data[finite], level)
        for slot, c in enumerate(np.flatnonzero(finite)):
            row = rows[c]
            for f, name in enumerate(("icc", "icc_2_1", "icc_3_1")):
                row[name] = float(forms.icc[f, slot])
                row[f"{name}_low"] = float(forms.low[f, slot])
                row[f"{name}_high"] = float(forms.high[f, slot])
            row["robust"] = bool(forms.low[0, slot] >= threshold)
            if forms.constant[slot]:
                row.update(status="skipped", reason="every cosine equal: no ICC")
    for c in np.flatnonzero(~finite):
        rows[c].update(status="skipped", reason="a cosine is NaN (a zero vector) for a subject")
    return typed_frame(rows, ROBUSTNESS_SCHEMA)


def channel_rows(
    features: pd.DataFrame, count: int, threshold: float, level: float = 0.95
) -> pd.DataFrame:
    """One row per layer x region of ``features`` (``subject_id``, ``perturbation``,
    layer, region, ``vector``): the ICC(1,1) of each channel over the complete
    subjects' perturbations 1..``count``, summarised: ``share_robust`` (channels with
    ICC >= ``threshold``), ``share_robust_ci`` (lower bound >= ``threshold``) and
    ``median_icc``, over the channels that vary (``n_constant`` do not: a channel that
    is 0 everywhere, a ReLU that never fires, has no ICC)."""
    subjects, _ = complete_subjects(features, count)
    rows: list[dict[str, Any]] = []
    groups = list(dict.fromkeys(features[["layer", "region"]].itertuples(index=False, name=None)))
    kept = features[features["subject_id"].isin(subjects) & (features["perturbation"] >= 1)]
    nan = float("nan")
    for layer, region in groups:
        part = kept[(kept["layer"] == layer) & (kept["region"] == region)]
        part = part.sort_values(["subject_id", "perturbation"], kind="stable")
        row: dict[str, Any] = {
            "layer": layer,
            "region": region,
            "channels": 0,
            "n_constant": 0,
            "n_subjects": len(subjects),
            "n_perturbations": count,
            "threshold": threshold,
            "share_robust": nan,
            "share_robust_ci": nan,
            "median_icc": nan,
            "status": "ok",
            "reason": "",
        }
        rows.append(row)
        if len(subjects) < 2:
            row.update(status="skipped", reason=f"{len(subjects)} complete subject(s); need 2")
            continue
        matrix = vector_matrix(part["vector"], str(layer))  # (subjects x K, channels)
        data = matrix.reshape(len(subjects), count, -1).transpose(2, 0, 1)
        row["channels"] = int(data.shape[0])
        if not np.isfinite(data).all():
            row.update(status="skipped", reason="non-finite vector values")
            continue
        forms = icc(data, level)
        varying = ~forms.constant
        row["n_constant"] = int(np.count_nonzero(forms.constant))
        if not varying.any():
            row.update(status="skipped", reason="every channel is constant")
            continue
        estimate, low = forms.icc[0, varying], forms.low[0, varying]
        row["share_robust"] = float(np.mean(estimate >= threshold))
        row["share_robust_ci"] = float(np.mean(low >= threshold))
        row["median_icc"] = float(np.median(estimate))
    return typed_frame(rows, ROBUSTNESS_CHANNELS_SCHEMA)


# ------------------------------------------------------ cohort stats --robust-only


def read_robust(folder: Path) -> pd.DataFrame:
    """``robustness.parquet`` of a ``cohort robustness`` folder; an
    :class:`~cohort.errors.OutputError` naming the fix when there is none."""
    path = Path(folder) / ROBUSTNESS_FILE
    if not path.is_file():
        raise OutputError(
            f"{path} does not exist: --robust-only takes the folder a `cohort robustness` "
            "run wrote (its --out); run `cohort robustness MANIFEST --out DIR` first"
        )
    return pq.read_table(path).to_pandas()


def robust_tests(
    features: pd.DataFrame,
    similarity: pd.DataFrame,
    cfg: StatsConfig,
    robustness: pd.DataFrame,
    source: str,
    table: SubjectTable | None = None,
    *,
    note: str = "",
) -> pd.DataFrame:
    """The run's cosine tests on the cosines ``robustness`` rates robust, with the
    Benjamini-Hochberg q-values recomputed over the tests that remain.

    The similarity table keeps only robust (layer, region pair) cosines, so each
    cosine family (within-pairs, within-depth, between-pairs) tests only those;
    the between-features families (vectors, not cosines; adjusted or not) are
    left out. ``table`` and ``note``: the covariates of the adjusted families
    (see :func:`cohort.stats.run_tests`). Every row's
    ``robust_only`` says what was kept and by which rule
    (:data:`~cohort.outputs.schemas.ROBUST_TESTS_SCHEMA`).
    """
    robust = robustness[robustness["robust"].astype(bool)]
    keep = pd.MultiIndex.from_frame(robust[_COSINE].astype(str))
    rated = pd.MultiIndex.from_frame(similarity[_COSINE].astype(str))
    chosen = similarity[rated.isin(keep)]
    tests = stats.run_tests(features, chosen, cfg, table, note=note)
    # the families loop over every layer x pair they saw: keep rows of robust cosines only
    robust_pairs = {(layer, f"{a}-{b}") for layer, a, b in keep}
    kept = [
        not family.startswith(FEATURE_FAMILY)
        and bool(layers)
        and all((la, pair) in robust_pairs for la in layers.split("|") for pair in pairs.split("|"))
        for family, layers, pairs in zip(
            tests["family"], tests["layer"], tests["pair"], strict=True
        )
    ]
    tests = tests[kept].reset_index(drop=True)
    _requantify(tests)
    threshold = float(robustness["threshold"].iloc[0]) if len(robustness) else float("nan")
    form = str(robustness["icc_form"].iloc[0]) if len(robustness) else FORMS[0]
    names = sorted(f"{pair_label(a, b)}@{layer}" for layer, a, b in keep)
    tests["robust_only"] = (
        f"{len(names)} of {len(robustness)} cosines with {form} CI low >= {threshold:g} "
        f"({source}): {', '.join(names) or 'none'}"
    )
    return typed_frame(tests.to_dict("records"), ROBUST_TESTS_SCHEMA)


def _requantify(tests: pd.DataFrame) -> None:
    """BH q-values within each family and over the run, of the ``ok`` tests, in place."""
    p = tests["p_value"].to_numpy(dtype=np.float64)
    ok = (tests["status"] == "ok").to_numpy(dtype=bool)
    family = tests["family"].to_numpy(dtype=object)
    q_family = np.full(p.shape, np.nan)
    for name in sorted(set(family.tolist())):
        members = ok & (family == name)
        q_family[members] = stats.bh_qvalues(p[members])
    q_run = np.full(p.shape, np.nan)
    q_run[ok] = stats.bh_qvalues(p[ok])
    tests["q_value"] = q_family
    tests["q_value_run"] = q_run
