"""The report's robustness section (a ``cohort robustness`` folder): ICCs with their CIs
per cosine and layer as a forest plot, the channels' summary, and one subject's
perturbations drawn as mask contours on a slice.

The contours are the perturbations themselves, replayed from the subject's files
and the settings in ``run.json`` (:func:`cohort.inputs.chain.perturb_pair` is a
pure function of them), not stored images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cohort.errors import CohortError
from cohort.outputs.schemas import pair_label
from cohort.report.figures import DPI
from cohort.report.markup import Page, escape, html_table, paragraph
from cohort.report.results import Results
from cohort.report.sections import manifest_subjects, region_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["fig_contours", "fig_forest", "robustness_section"]

_FILE: Final = "robustness.parquet"
_COLOURS: Final = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def fig_forest(table: pd.DataFrame, threshold: float) -> Figure:
    """ICC(1,1) with its CI per cosine, one panel per layer; the threshold as a line."""
    layers = [str(v) for v in pd.unique(table["layer"])]
    regions = zip(table["region_a"], table["region_b"], strict=True)
    pairs = [pair_label(a, b) for a, b in dict.fromkeys(regions)]
    fig = _figure(0.8 + 2.4 * len(layers), 0.9 + 0.38 * len(pairs))
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)[0]
    for ax, layer in zip(axes, layers, strict=True):
        rows = table[table["layer"] == layer]
        for y, pair in enumerate(pairs):
            hit = rows[
                [
                    pair_label(a, b) == pair
                    for a, b in zip(rows["region_a"], rows["region_b"], strict=True)
                ]
            ]
            if hit.empty or not np.isfinite(float(hit["icc"].iloc[0])):
                continue
            icc, low, high = (float(hit[c].iloc[0]) for c in ("icc", "icc_low", "icc_high"))
            colour = "#2ca02c" if bool(hit["robust"].iloc[0]) else "#d62728"
            ax.plot([low, high], [y, y], color=colour, lw=1.6)
            ax.plot([icc], [y], "o", color=colour, ms=5)
        ax.axvline(threshold, color="0.4", ls="--", lw=0.9)
        ax.set_yticks(range(len(pairs)), pairs)
        ax.set_ylim(len(pairs) - 0.5, -0.5)
        ax.set_xlim(min(-0.05, float(np.nanmin(table["icc_low"])) - 0.05), 1.02)
        ax.set_xlabel("ICC(1,1), 95 % CI")
        ax.set_title(layer)
    return fig


def fig_contours(
    image: np.ndarray, masks: list[list[np.ndarray]], names: list[str], aspect: float, title: str
) -> Figure:
    """A coronal slice with each region's contour: the original thick, each perturbation thin.

    ``masks[p][r]`` is region ``r`` of perturbation ``p`` (0 = the original) on the slice.
    """
    from matplotlib.lines import Line2D

    fig = _figure(4.2, 4.4)
    ax = fig.subplots()
    low, high = np.percentile(image, [1, 99.5])
    ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
    for p, regions in enumerate(masks):
        for r, mask in enumerate(regions):
            if mask.any():
                colour = _COLOURS[r % len(_COLOURS)]
                width, alpha = (1.8, 1.0) if p == 0 else (0.6, 0.7)
                ax.contour(
                    mask.astype(float), [0.5], colors=[colour], linewidths=width, alpha=alpha
                )
    handles = [
        Line2D([], [], color=_COLOURS[r % len(_COLOURS)], label=n) for r, n in enumerate(names)
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncols=3)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def robustness_section(page: Page, results: Results) -> str | None:
    """The section's HTML, or None when ``results`` is not a ``cohort robustness`` folder."""
    path = results.folder / _FILE
    if not path.is_file():
        return None
    table = pq.read_table(path).to_pandas()
    record: dict[str, Any] = results.run.get("robustness") or {}
    threshold = float(record.get("threshold", table["threshold"].iloc[0] if len(table) else 0.9))
    first = table.iloc[0] if len(table) else None
    settings = record.get("perturbations", {})
    parts = [
        paragraph(
            "Test-retest stability of every cosine: each subject was analysed again under "
            f"{settings.get('count', '?')} random perturbations "
            f"({escape(' + '.join(settings.get('chain', [])))}); the ICC(1,1) "
            "(one-way random effects, absolute agreement, single measurement) takes the "
            "perturbations as repeated measurements of the subject. A cosine is <b>robust</b> "
            f"when the lower end of its 95 % CI reaches {threshold:g} (green)."
            + (
                f" {int(first['n_subjects'])} subjects entered, {int(first['n_excluded'])} left "
                "out (a perturbation failed, see robustness_errors.csv)."
                if first is not None
                else ""
            )
        )
    ]
    if len(table) and table["icc"].notna().any():
        parts.append(
            page.figure(
                fig_forest(table, threshold),
                "robustness_forest",
                "ICC with 95 % CI of every cosine, per layer",
                "ICC(1,1) of each region pair's cosine per layer, with its F-distribution 95 % "
                "CI (Shrout & Fleiss 1979); dashed: the threshold. Green: robust.",
            )
        )
    columns = ["layer", "region_a", "region_b", "icc", "icc_low", "icc_high", "robust"]
    columns += ["icc_2_1", "icc_3_1", "n_subjects", "status", "reason"]
    digits = dict.fromkeys(["icc", "icc_low", "icc_high", "icc_2_1", "icc_3_1"], 3)
    parts.append(html_table(table[columns], digits=digits, table_id="robustness"))
    channels = results.folder / "robustness_channels.parquet"
    if channels.is_file():
        frame = pq.read_table(channels).to_pandas()
        parts.append(
            paragraph(
                "The pooled vectors themselves, channel by channel: the share of channels whose "
                f"ICC(1,1) reaches {threshold:g} (share_robust; share_robust_ci: whose CI's "
                "lower end does) and the median ICC, per layer and region."
            )
        )
        parts.append(html_table(frame, digits={"median_icc": 3}, table_id="channels"))
    parts.append(_contours(page, results, record))
    return "".join(parts)


def _contours(page: Page, results: Results, record: dict[str, Any]) -> str:
    """One subject's perturbations as mask contours on a slice, replayed from its files."""
    from cohort.config import PreprocessConfig
    from cohort.inputs.chain import perturb_pair
    from cohort.inputs.chain_config import PerturbationConfig
    from cohort.inputs.geometry import select_regions, to_dhw
    from cohort.inputs.readers import load_pair

    subjects, why = manifest_subjects(results.run)
    done = set(results.features["subject_id"].astype(str))
    chosen = sorted((s for s in subjects if s.subject_id in done), key=lambda s: s.subject_id)
    if why or not chosen or not record.get("perturbations"):
        return paragraph(f"No perturbation contours: {why or 'no finished subject'}.", "note")
    subject = chosen[0]
    values = dict(record["perturbations"])
    values["chain"] = tuple(values["chain"])
    cfg = PerturbationConfig(**values)
    labels = region_names(results.run, subject)
    try:
        pair = load_pair(Path(subject.image), Path(subject.mask), PreprocessConfig(), labels)
        versions = [pair]
        for index in range(1, cfg.count + 1):
            try:
                versions.append(perturb_pair(pair, labels, cfg, subject.subject_id, index)[0])
            except CohortError:
                continue  # a failed perturbation: in robustness_errors.csv, not drawn
    except (CohortError, OSError) as err:
        return paragraph(f"No perturbation contours: {escape(err)}.", "warn")
    image, spacing = to_dhw(pair.image.data, pair.image.affine)
    stacks = [
        [to_dhw(m, v.regions.affine)[0] for _, m in select_regions(v.regions, labels)]
        for v in versions
    ]
    union = np.any(np.stack(stacks[0]), axis=0)
    along = np.flatnonzero(union.any(axis=(0, 2)))
    h = int((along[0] + along[-1]) // 2) if along.size else union.shape[1] // 2
    masks = [[m[:, h, :] for m in regions] for regions in stacks]
    names = [name for name, _ in labels]
    title = f"{subject.subject_id}: original and {len(versions) - 1} perturbations"
    return page.figure(
        fig_contours(np.asarray(image[:, h, :]), masks, names, spacing[0] / spacing[2], title),
        "robustness_contours",
        "One subject's region contours under every perturbation",
        f"Subject {escape(subject.subject_id)}, coronal slice {h + 1} through the middle of its "
        "regions: the original contours (thick) and those of every perturbation (thin), replayed "
        "from its files with the run's settings.",
    )
