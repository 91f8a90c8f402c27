"""The report page: every section in order, written as one self-contained file.

:func:`write_report` reads a finished run's folder (``run.json``,
``features.parquet``, ``similarity.parquet``, ``stats.parquet``,
``errors.parquet``) and writes into ``<folder>/report`` (or ``out``):

- ``report.html``: every figure embedded as a base64 PNG, every table as plain
  HTML, no network needed to open it (a small script makes the tables
  sortable and records on ``<body>`` how many images loaded);
- ``<figure>.png`` and ``<figure>.svg`` for each figure, for a paper.

A run with one cohort leaves out the between-cohort plots and says why; a
missing or unreadable manifest leaves out the overlays and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pandas as pd

from cohort import stats
from cohort.outputs import store
from cohort.report.adjusted import adjusted_section, harmonisation_section
from cohort.report.figures import (
    apply_style,
    cohort_colours,
    fig_depth,
    fig_distributions,
    fig_origin,
    fig_pca,
    layer_depth_order,
)
from cohort.report.markup import Page, escape, html_table, paragraph, static_text
from cohort.report.results import Results, read_results
from cohort.report.robustness import robustness_section
from cohort.report.sections import (
    cards,
    errors_section,
    manifest_subjects,
    overlay_section,
    provenance_section,
    stats_section,
)
from cohort.report.subjects import OUTLIER_Z, subjects_table

__all__ = ["REPORT_DIR", "REPORT_FILE", "write_report"]

REPORT_DIR: Final = "report"
REPORT_FILE: Final = "report.html"


def write_report(results: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` and every figure (PNG + SVG) for the run in ``results``.

    ``out`` defaults to ``results / "report"``. Returns the path of report.html.
    Raises :class:`~cohort.errors.OutputError` when ``results`` is not a finished
    run's folder.
    """
    data = read_results(Path(results))
    out = Path(out) if out is not None else Path(results) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    apply_style()
    page = Page(out)
    subjects_manifest, _ = manifest_subjects(data.run)
    subjects = subjects_table(data, [s.subject_id for s in subjects_manifest])
    colours = cohort_colours(data.cohorts)
    layers = data.layers
    has_cosines = not data.similarity.empty
    no_cosines = paragraph(
        "No subject finished, so there are no cosines to show; see the errors below.", "warn"
    )
    centred_note = (
        " Cosines are <b>centred</b>: computed after subtracting the pooled mean vector of each "
        "layer (the run's --centre), so they are not comparable with raw cosines."
        if data.centred
        else ""
    )

    # 1-3. the origin study's table, distributions per layer, across depth
    if has_cosines:
        _cosine_sections(page, data, colours, centred_note)
    else:
        page.section("table", "Similarity table", no_cosines)
        page.section("distributions", "Cosines per cohort", no_cosines)
        page.section("depth", "Similarity across depth", no_cosines)

    # 4. PCA
    if len(data.features):
        page.section(
            "embedding",
            "Feature embedding",
            page.figure(
                fig_pca(data.features, layers, data.regions, colours),
                "pca",
                "PCA of region feature vectors per layer, coloured by cohort",
                "Each point is one subject's pooled feature vector of one region, projected "
                "on the first two principal components of that layer's vectors (plain SVD of "
                "the centred matrix). Colour: cohort; marker: region.",
            ),
        )
    else:
        page.section("embedding", "Feature embedding", no_cosines)

    # 5. what the regions are
    page.section("regions", "What the regions are", overlay_section(page, data))

    # 6. tests, and with covariates or harmonisation their own sections
    page.section("stats", "Statistical tests", stats_section(data))
    if data.run.get("covariates", {}).get("covariates"):
        page.section("adjusted", "Adjusted between-cohort tests", adjusted_section(page, data))
    if data.run.get("harmonisation"):
        page.section(
            "harmonisation",
            "Site effect before and after ComBat",
            harmonisation_section(page, data),
        )

    # 6b. robustness (a cohort robustness folder)
    robust = robustness_section(page, data)
    if robust is not None:
        page.section("robustness", "Robustness under perturbation", robust)

    # 7. subjects
    outliers = [bool(o) for o in subjects["outlier"]]
    row_class = [
        "failed" if s == "failed" else ("outlier" if o else "")
        for s, o in zip(subjects["status"], outliers, strict=True)
    ]
    page.section(
        "subjects",
        "Subjects",
        paragraph(
            f"All {len(subjects)} subjects of the run: done ones with their region sizes in "
            f"voxels, failed ones with the stage that failed. <i>outlier</i> lists cosines "
            f"whose robust z-score (median and MAD within cohort, layer and pair) exceeds "
            f"{OUTLIER_Z:g}: {sum(outliers)} subject(s)."
        ),
        html_table(subjects, row_class=row_class, table_id="subjects"),
    )

    # 8. errors, 9. provenance
    page.section("errors", "Errors", errors_section(data))
    page.section("provenance", "Provenance", provenance_section(data.run))

    path = out / REPORT_FILE
    tmp = store.atomic_path(path)
    tmp.write_text(_page_html(data, subjects, page), encoding="utf-8")
    tmp.replace(path)
    return path


def _cosine_sections(page: Page, data: Results, colours: dict[str, str], centred_note: str) -> None:
    """The similarity table, the cosines per cohort and the depth plot (there are cosines)."""
    cohorts, layers, pairs = data.done_cohorts, data.layers, data.pairs
    summary = stats.summarise(data.similarity, data.stats_cfg)
    origin = stats.origin_table(data.similarity)
    counts = {
        c: int(data.similarity.loc[data.similarity["cohort"] == c, "subject_id"].nunique())
        for c in cohorts
    }
    page.section(
        "table",
        "Similarity table",
        page.figure(
            fig_origin(origin, layers, counts),
            "similarity_table",
            "Heatmap of mean cosine per region pair and layer, per cohort",
            "The origin study's table per cohort: mean cosine similarity of each region "
            "pair (rows) at each hooked layer (columns), over the cohort's subjects "
            f"(similarity.csv).{centred_note}",
        ),
        html_table(origin, digits=dict.fromkeys(layers, 4), table_id="origin", fixed=True),
    )
    if len(cohorts) < 2:
        page.section(
            "distributions",
            "Cosines per cohort",
            paragraph(
                f"This run has one cohort ({escape(cohorts[0])}), so the between-cohort plots "
                "(each pair's cosines compared across cohorts, with the between-cohort test) "
                "are left out: a between-cohort comparison needs at least two cohorts. Give "
                "the manifest a <code>cohort</code> column with two or more groups to compare "
                "them.",
                "note",
            ),
        )
    else:
        test = "Kruskal-Wallis" if len(cohorts) >= 3 else "Mann-Whitney U"
        figs = [
            page.figure(
                fig_distributions(data.similarity, data.tests, layer, pairs, cohorts, colours),
                f"cosines_{layer}",
                f"Cosine per subject at {layer}, per region pair and cohort",
                f"<b>{escape(layer)}</b>: each dot is one subject's cosine between two regions; "
                f"boxes show median and quartiles. Titles give the two-sided {test} test "
                "between cohorts (q: Benjamini-Hochberg within the between-pairs family) and "
                f"its effect size.{centred_note}",
            )
            for layer in layers
        ]
        page.section("distributions", "Cosines per cohort", *figs)
    depth = layer_depth_order(layers, data.run)
    level = data.stats_cfg.ci_level
    page.section(
        "depth",
        "Similarity across depth",
        page.figure(
            fig_depth(summary, depth, pairs, cohorts, level),
            "depth",
            "Mean cosine per region pair across layers with bootstrap CI bands",
            f"Cohort mean cosine of each region pair from the shallowest to the deepest "
            f"hooked layer; bands are {level:.0%} seeded percentile bootstrap intervals "
            f"of the mean ({data.stats_cfg.bootstrap} resamples of subjects).{centred_note}",
        ),
    )


def _page_html(results: Results, subjects: pd.DataFrame, page: Page) -> str:
    weights = results.run.get("weights", {}) or {}
    title = f"cohort report: {results.folder.resolve().name}"
    notes = "".join(paragraph(escape(n) + ".", "warn") for n in results.notes)
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in page.toc)
    lede = (
        f"Result folder <code>{escape(results.folder.resolve())}</code>. Weights: "
        f"{escape(weights.get('detail') or weights.get('source', 'not recorded'))}. Cohorts: "
        f"{escape(', '.join(results.cohorts) or 'none')}."
    )
    css, errors_js, page_js = (static_text(n) for n in ("report.css", "errors.js", "report.js"))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{css}</style><script>{errors_js}</script>"
        f"</head><body><main><h1>{escape(title)}</h1>"
        f'<p class="lede">{lede}</p>{cards(results, subjects)}<nav>{nav}</nav>{notes}'
        f"{''.join(page.sections)}</main><script>{page_js}</script></body></html>\n"
    )
