"""The report's adjusted sections: covariates and adjusted tests, and the site effect of
harmonisation (ComBat) before and after.

Shown only for runs made with ``--covariates`` (the adjusted section: the
covariates with their types and levels, each adjusted row beside the unadjusted
one, and each cosine against each continuous covariate by cohort) or
``--harmonise`` / ``--harmonise-with`` (the site effect: the share of feature
variance the batch and the cohort explain before and after, and the first two
principal components of the features coloured by batch, before and after).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cohort.outputs.schemas import pair_label
from cohort.report.figures import cohort_colours, pca_2d
from cohort.report.markup import Page, escape, html_table, paragraph
from cohort.report.results import Results

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["adjusted_section", "fig_covariate", "fig_site_pca", "harmonisation_section"]

_UNADJUSTED = {
    "between-pairs-adjusted": "between-pairs",
    "between-features-adjusted": "between-features",
}


def _covariates(results: Results) -> pd.DataFrame:
    path = results.folder / "covariates.parquet"
    if not path.is_file():
        return pd.DataFrame({"subject_id": pd.Series(dtype=str)})
    return pq.read_table(path).to_pandas().astype(str)


def _numbers(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)


def fig_covariate(
    similarity: pd.DataFrame,
    covariates: pd.DataFrame,
    name: str,
    layer: str,
    pairs: Sequence[tuple[str, str]],
    colours: Mapping[str, str],
) -> Figure:
    """Each subject's cosine at ``layer`` against covariate ``name``, one panel per pair,
    coloured by cohort, with each cohort's least-squares line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.4 + 3.1 * len(pairs), 3.3), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    rows = similarity[similarity["layer"].astype(str) == layer].merge(
        covariates[["subject_id", name]], on="subject_id", how="inner"
    )
    for ax, (a, b) in zip(axes, pairs, strict=True):
        pair_rows = rows[(rows["region_a"] == a) & (rows["region_b"] == b)]
        for cohort, colour in colours.items():
            part = pair_rows[pair_rows["cohort"].astype(str) == cohort]
            x, y = _numbers(part[name]), part["cosine"].to_numpy(dtype=np.float64)
            keep = np.isfinite(x) & np.isfinite(y)
            x, y = x[keep], y[keep]
            if x.size:
                ax.scatter(x, y, s=12, alpha=0.75, color=colour, edgecolors="none", label=cohort)
            if x.size >= 2 and np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                grid = np.linspace(x.min(), x.max(), 2)
                ax.plot(grid, intercept + slope * grid, color=colour, linewidth=1.2)
        ax.set_title(pair_label(a, b))
        ax.set_xlabel(name)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(color="0.93")
    axes[0].set_ylabel(f"cosine at {layer}")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center")
    return fig


def _side_by_side(tests: pd.DataFrame) -> pd.DataFrame:
    """Each adjusted row beside the unadjusted test of the same cohorts, layer and pair."""
    adjusted = tests[tests["family"].isin(list(_UNADJUSTED))].copy()
    adjusted["base"] = adjusted["family"].map(_UNADJUSTED)
    plain = tests[tests["family"].isin(list(_UNADJUSTED.values()))]
    keys = ["cohort", "layer", "pair"]
    merged = adjusted.merge(
        plain, left_on=[*keys, "base"], right_on=[*keys, "family"], suffixes=("", "_plain")
    )
    columns = {
        "cohort": "cohorts",
        "layer": "layer",
        "pair": "pair",
        "test_plain": "unadjusted test",
        "q_value_plain": "q unadjusted",
        "effect_size_plain": "effect unadjusted",
        "test": "adjusted test",
        "adjusted_for": "adjusted for",
        "statistic": "F adjusted",
        "q_value": "q adjusted",
        "effect_name": "adjusted effect",
        "effect_size": "effect adjusted",
        "status": "status",
        "reason": "reason",
    }
    return merged[list(columns)].rename(columns=columns)


def adjusted_section(page: Page, results: Results) -> str:
    """The covariates, the adjusted rows beside the unadjusted ones, cosine vs covariate."""
    described = results.run.get("covariates") or {}
    specs = described.get("covariates") or []
    parts = []
    items = []
    for spec in specs:
        kind = spec.get("type", "")
        if kind == "categorical":
            levels = ", ".join(str(v) for v in spec.get("levels", []))
            items.append(
                f"<b>{escape(spec['name'])}</b> categorical (levels {escape(levels)}; reference "
                f"{escape(spec.get('reference'))})"
            )
        else:
            items.append(f"<b>{escape(spec['name'])}</b> continuous")
    strata = described.get("strata")
    text = (
        "Between-cohort tests adjusted for "
        + "; ".join(items)
        + f" (from {escape(described.get('source', ''))}). "
        "Per cosine: the linear model cosine ~ cohort + covariates, F of the cohort term "
        "given the covariates (type II), p-value by Freedman-Lane permutation of the reduced "
        "model's residuals, partial eta squared with a bootstrap CI. Per feature space: "
        'PERMANOVA on cosine distances by margin (vegan\'s adonis2, by = "margin"), R² of the '
        "cohort term."
    )
    if strata:
        text += f" Permutations stay within the strata of <b>{escape(strata['name'])}</b>."
    parts.append(paragraph(text))
    if not results.tests.empty and "adjusted_for" in results.tests:
        table = _side_by_side(results.tests)
        if len(table):
            parts.append(
                html_table(
                    table,
                    digits={"q unadjusted": 3, "q adjusted": 3},
                    table_id="adjusted",
                )
            )
    covariates = _covariates(results)
    continuous = [s["name"] for s in specs if s.get("type") == "continuous"]
    colours = cohort_colours(results.cohorts)
    for name in continuous:
        if name not in covariates or results.similarity.empty:
            continue
        for layer in results.layers:
            parts.append(
                page.figure(
                    fig_covariate(
                        results.similarity, covariates, name, layer, results.pairs, colours
                    ),
                    f"covariate_{name}_{layer}",
                    f"Cosine against {name} at {layer}, by cohort",
                    f"<b>{escape(layer)}</b>: each subject's cosine between two regions "
                    f"against {escape(name)}, coloured by cohort, with each cohort's "
                    "least-squares line. Parallel lines that coincide once the covariate is "
                    "taken into account mean the cohorts differ only through it.",
                )
            )
    return "".join(parts)


def fig_site_pca(
    before: pd.DataFrame, after: pd.DataFrame, sites: Mapping[str, str], layers: Sequence[str]
) -> Figure:
    """First two principal components of each layer's vectors, coloured by batch: the raw
    vectors (top) and the harmonised ones (bottom)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(0.8 + 3.3 * len(layers), 6.4), dpi=120, layout="constrained")
    axes = fig.subplots(2, len(layers), squeeze=False)
    names = sorted(set(sites.values()))
    colours = cohort_colours(names)
    for row, (label, table) in enumerate((("before", before), ("after", after))):
        for ax, layer in zip(axes[row], layers, strict=True):
            part = table[table["layer"].astype(str) == layer]
            matrix = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in part["vector"]])
            finite = np.isfinite(matrix).all(axis=1)
            scores, share = pca_2d(matrix[finite])
            site = np.array([sites.get(str(s), "") for s in part["subject_id"]])[finite]
            for name in names:
                keep = site == name
                ax.scatter(scores[keep, 0], scores[keep, 1], s=12, alpha=0.7,
                           color=colours[name], edgecolors="none", label=name)  # fmt: skip
            ax.set_title(f"{layer}, {label} ComBat")
            ax.set_xlabel(f"PC1 ({share[0]:.0%})")
            ax.set_ylabel(f"PC2 ({share[1]:.0%})")
            ax.grid(color="0.94")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center")
    return fig


def harmonisation_section(page: Page, results: Results) -> str:
    """The site effect before and after ComBat: variance shares and PCA by batch."""
    summary: Mapping[str, Any] = results.run.get("harmonisation") or {}
    batch = str(summary.get("batch", ""))
    rows = [
        ("batch column", batch),
        ("batches", ", ".join(str(b) for b in summary.get("batches", []))),
        ("model", f"{summary.get('model', '')}" + (
            f" (from {summary['applied_from']})" if summary.get("applied_from") else "")),
        ("subjects harmonised", summary.get("subjects", "")),
        ("subjects left out", (summary.get("left_out") or {}).get("count", 0)),
        ("features (channels of each layer x region)", summary.get("features", "")),
        ("features left as they are (no variance)", summary.get("unchanged_features", "")),
        ("feature variance share of the batch, before", summary.get("batch_share_before")),
        ("... after", summary.get("batch_share_after")),
        ("share explained by cohort, before", summary.get("cohort_share_before")),
        ("... after (a large drop would mean over-correction)", summary.get("cohort_share_after")),
    ]  # fmt: skip
    frame = pd.DataFrame(
        [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows],
        columns=["item", "value"],
    )
    parts = [
        paragraph(
            "ComBat (parametric empirical Bayes, as neuroCombat defines it) on the pooled "
            "feature vectors, preserving cohort and the covariates; the statistics above use "
            "the harmonised vectors, features.parquet keeps the raw ones."
        ),
        html_table(frame, sortable=False),
    ]
    path = results.folder / "features_harmonised.parquet"
    covariates = _covariates(results)
    if path.is_file() and batch in covariates and len(results.features):
        after = pq.read_table(path).to_pandas()
        sites = dict(zip(covariates["subject_id"], covariates[batch], strict=True))
        parts.append(
            page.figure(
                fig_site_pca(results.features, after, sites, results.layers),
                "site_effect",
                f"PCA of the feature vectors coloured by {batch}, before and after ComBat",
                f"First two principal components of each layer's vectors (all regions), "
                f"coloured by {escape(batch)}: the raw vectors (top) and the harmonised ones "
                "(bottom). Batches that separate before and overlap after show the site "
                "effect ComBat removed.",
            )
        )
    return "".join(parts)
