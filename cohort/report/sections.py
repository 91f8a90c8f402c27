"""The report's sections that are not figures: overlays, cards, tests, errors, provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cohort import stats
from cohort.config import BACKGROUND
from cohort.errors import CohortError
from cohort.outputs import schemas
from cohort.report.figures import Slice, fig_overlays, load_slice
from cohort.report.markup import Page, escape, html_table, paragraph
from cohort.report.results import Results

__all__ = [
    "cards",
    "errors_section",
    "manifest_subjects",
    "overlay_section",
    "provenance_section",
    "region_names",
    "stats_section",
]


def manifest_subjects(run: Mapping[str, Any]) -> tuple[list[Any], str]:
    """The manifest's subjects, or [] and a sentence saying why they cannot be read."""
    from cohort.inputs.manifest import read_manifest
    from cohort.outputs.provenance import saved_adjust_config

    path = run.get("manifest")
    if not path:
        return [], "run.json does not record the manifest's path (runs before cohort 0.1 did not)"
    # the columns the run named as covariates, strata or batch are allowed in its manifest
    extras = [*saved_adjust_config(run).columns(), (run.get("harmonisation") or {}).get("batch")]
    try:
        return list(read_manifest(Path(str(path)), [e for e in extras if e])), ""
    except CohortError as err:
        return [], f"the manifest {escape(path)} cannot be read now ({escape(err)})"


def region_names(run: Mapping[str, Any], subject: Any) -> tuple[tuple[str, int | None], ...]:
    """The subject's regions: its own label map, else the run's (values None for names
    that a mask folder or a Slicer segmentation gives)."""
    labels = getattr(subject, "labels", None) or run.get("config", {}).get("regions", {}).get(
        "labels"
    )
    return tuple((str(n), None if v is None else int(v)) for n, v in labels or ())


def overlay_section(page: Page, results: Results) -> str:
    subjects, why = manifest_subjects(results.run)
    if why:
        return paragraph(f"No image overlay: {why}.", "note")
    done = set(results.features["subject_id"].astype(str))
    slices: list[Slice] = []
    problems: list[str] = []
    for cohort in results.done_cohorts:
        candidates = sorted(
            (s for s in subjects if s.cohort == cohort and s.subject_id in done),
            key=lambda s: s.subject_id,
        )
        for subject in candidates[:3]:
            try:
                slices.append(
                    load_slice(
                        subject.subject_id,
                        cohort,
                        subject.image,
                        subject.mask,
                        region_names(results.run, subject),
                        subject.series_uid,
                    )
                )
                break
            except (CohortError, OSError) as err:
                problems.append(f"{escape(subject.subject_id)}: {escape(err)}")
        else:
            problems.append(f"cohort {escape(cohort)}: no finished subject's files could be read")
    parts = []
    if slices:
        background = results.run.get("background") or (
            BACKGROUND if BACKGROUND in results.regions else None
        )
        caption = (
            "One subject per cohort (the first finished one by id): a coronal slice through "
            "the middle of its labelled voxels, with each named region's mask outlined and "
            "filled. Patient orientation: S superior, I inferior, L left, R right."
        )
        if background:
            caption += f" The region <i>{escape(background)}</i> is every voxel in no named label."
        parts.append(
            page.figure(
                fig_overlays(slices),
                "overlay",
                "Mid-slice of one subject per cohort with region masks",
                caption,
            )
        )
    if problems:
        parts.append(paragraph("Overlay problems: " + "; ".join(problems) + ".", "warn"))
    return "".join(parts)


def cards(results: Results, subjects: pd.DataFrame) -> str:
    counts = results.run.get("counts", {})
    failed = int((subjects["status"] == "failed").sum())
    items = [
        (str(len(subjects)), "subjects", ""),
        (str(int((subjects["status"] == "done").sum())), "done", ""),
        (str(failed), "failed", "bad" if failed else ""),
        (str(len(results.cohorts)), "cohorts", ""),
        (str(len(results.layers)), "layers", ""),
    ]
    if counts.get("cached"):
        items.append((str(counts["cached"]), "reused from an earlier run", ""))
    seconds = results.run.get("timings", {}).get("total_s")
    if seconds is not None:
        items.append((f"{float(seconds):.1f} s", "run time", ""))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card {cls}"><b>{escape(v)}</b><span>{escape(label)}</span></div>'
            for v, label, cls in items
        )
        + "</div>"
    )


def stats_section(results: Results) -> str:
    tests = results.tests
    if tests.empty:
        return paragraph("No tests were recorded (stats.parquet is empty or missing).", "note")
    alpha = results.stats_cfg.alpha
    classes = []
    for _, row in tests.iterrows():
        if str(row["flag"]):
            classes.append("flagged")
        elif str(row["status"]) == "ok" and float(row["q_value"]) <= alpha:
            classes.append("sig")
        else:
            classes.append("")
    n_flagged = classes.count("flagged")
    flags = stats.sanity_flags(results.features, results.similarity)
    parts = [
        paragraph(
            f"{len(tests)} tests, {int((tests['status'] == 'ok').sum())} ran. q_value is the "
            "Benjamini-Hochberg adjusted p-value within the test's family, q_value_run over "
            f"every test of the run; q ≤ {alpha:g} is bold. CIs are seeded percentile "
            f"bootstrap intervals ({results.stats_cfg.ci_level:.0%}) of the effect size. "
            "Click a column heading to sort."
        ),
        paragraph(
            f"<b>{n_flagged}</b> row(s) carry a sanity flag (highlighted; see the list below)."
            if n_flagged
            else "No test carries a sanity flag.",
            "warn" if n_flagged else "note",
        ),
        html_table(
            tests[list(schemas.TESTS_COLUMNS)],
            digits={"p_value": 3, "q_value": 3, "q_value_run": 3},
            row_class=classes,
            table_id="stats",
        ),
    ]
    parts.append("<h3>Sanity flags</h3>")
    if flags.empty:
        parts.append(
            paragraph(
                "None: no cosine of exactly 1, no NaN cosine, no zero or non-finite vector, "
                "no two layers with identical vectors."
            )
        )
    else:
        shown = flags.head(500)
        more = f" (first 500 of {len(flags)})" if len(flags) > 500 else ""
        parts.append(paragraph(f"{len(flags)} suspicious value(s){more}:"))
        parts.append(html_table(shown, row_class=["flagged"] * len(shown), table_id="flags"))
    return "".join(parts)


def errors_section(results: Results) -> str:
    errors = results.errors
    if errors.empty:
        return paragraph("No subject failed.", "note")
    frame = errors[["subject_id", "cohort", "stage", "error_type", "message", "image", "mask"]]
    table = html_table(frame.astype(str), row_class=["failed"] * len(frame), table_id="errors")
    table = table.replace("<td>", '<td class="msg">')
    return (
        paragraph(
            f"{len(errors)} subject(s) failed; their results are not in the tables and figures "
            "above. Fix the cause (the message says how) and rerun: finished subjects are reused.",
            "warn",
        )
        + table
    )


def provenance_section(run: Mapping[str, Any]) -> str:
    weights = run.get("weights", {}) or {}
    rows = [
        ("weights", weights.get("detail") or weights.get("source", "")),
        ("weights sha256", weights.get("sha256", "")),
        ("device", "; ".join(str(d) for d in run.get("device", []) or []) or "none recorded"),
        ("manifest", run.get("manifest", "not recorded")),
        ("counts", ", ".join(f"{k} {v}" for k, v in (run.get("counts", {}) or {}).items())),
        (
            "timings",
            ", ".join(f"{k} {v}" for k, v in (run.get("timings", {}) or {}).items()),
        ),
    ]
    info = html_table(pd.DataFrame(rows, columns=["item", "value"]).astype(str), sortable=False)
    versions = run.get("versions", {}) or {}
    parts = [info, "<h3>Versions</h3>"]
    parts.append(
        html_table(
            pd.DataFrame(sorted(versions.items()), columns=["package", "version"]).astype(str),
            sortable=False,
        )
    )
    layers = run.get("layers", []) or []
    if layers:
        frame = pd.DataFrame(layers)
        keep = [c for c in ("layer", "module_path", "channels", "grid", "rank") if c in frame]
        parts.append("<h3>Hooked layers</h3>")
        parts.append(html_table(frame[keep].astype(str), sortable=False))
    parts.append("<h3>Configuration</h3>")
    config = json.dumps(run.get("config", {}), indent=2, sort_keys=True)
    parts.append(f"<pre>{escape(config)}</pre>")
    return "".join(parts)
