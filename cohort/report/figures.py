"""The report's figures: matplotlib, no pyplot state, each saved as PNG and SVG.

The origin study's table as a heatmap per cohort; per layer the cosines of
each region pair per cohort (strip + box) with the between-cohort test's
q-value; cohort means across depth with bootstrap CI bands; a PCA embedding of
the feature vectors per layer; one mid-slice overlay of image and region masks
per cohort.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from cohort.outputs.schemas import pair_label

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "Figured",
    "Slice",
    "apply_style",
    "cohort_colours",
    "fig_depth",
    "fig_distributions",
    "fig_origin",
    "fig_overlays",
    "fig_pca",
    "layer_depth_order",
    "load_slice",
    "pca_2d",
    "save_figure",
]

DPI: Final = 120
_MARKERS: Final = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


@dataclass(frozen=True)
class Figured:
    """One saved figure."""

    name: str  # file stem in the report folder
    png: bytes
    alt: str  # what the figure shows, for screen readers and broken-image text
    caption: str  # HTML


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def apply_style() -> None:
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "svg.hashsalt": "cohort",  # deterministic SVG ids
            "font.size": 9,
            "axes.titlesize": 9.5,
            "axes.labelsize": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.fontsize": 8,
            "legend.frameon": False,
        }
    )


def save_figure(fig: Figure, out: Path, name: str, alt: str, caption: str) -> Figured:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    png = buffer.getvalue()
    (out / f"{name}.png").write_bytes(png)
    fig.set_layout_engine("none")  # keep the layout the PNG got; do not solve it again
    fig.savefig(out / f"{name}.svg", format="svg", metadata={"Date": None, "Creator": None})
    fig.clear()
    return Figured(name, png, alt, caption)


def cohort_colours(cohorts: Sequence[str]) -> dict[str, str]:
    """One tab10 colour per cohort, by sorted name, the same in every figure."""
    palette = [*("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")]
    palette += ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return {c: palette[i % len(palette)] for i, c in enumerate(sorted(cohorts))}


def fig_origin(origin: pd.DataFrame, layers: Sequence[str], counts: Mapping[str, int]) -> Figure:
    """The origin study's table (region pairs x layers, cohort mean cosine) per cohort."""
    cohorts = [str(c) for c in pd.unique(origin["cohort"])]
    pairs = [str(p) for p in pd.unique(origin["pair"])]
    values = origin[list(layers)].to_numpy(dtype=np.float64)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.01, vmax + 0.01
    fig = _new_figure(0.6 + 2.9 * len(cohorts) + 0.2 * len(layers), 0.9 + 0.42 * len(pairs))
    axes = fig.subplots(1, len(cohorts), squeeze=False)[0]
    image = None
    for ax, cohort in zip(axes, cohorts, strict=True):
        rows = origin[origin["cohort"].astype(str) == cohort].set_index("pair").reindex(pairs)
        grid = rows[list(layers)].to_numpy(dtype=np.float64)
        image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(layers)), list(layers))
        ax.set_yticks(range(len(pairs)), pairs)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"{cohort} (n = {counts.get(cohort, 0)})")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid[i, j]
                level = (v - vmin) / (vmax - vmin) if math.isfinite(v) else 0.0
                ax.text(
                    j,
                    i,
                    f"{v:.4f}" if math.isfinite(v) else "n/a",
                    ha="center",
                    va="center",
                    fontsize=8.5,
                    color="black" if level > 0.55 else "white",
                )
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.9, label="mean cosine")
    return fig


def _between_row(tests: pd.DataFrame, layer: str, pair: str, cohorts: Sequence[str]) -> pd.Series:
    """The between-cohort test of one layer and pair (Kruskal-Wallis for >= 3 cohorts)."""
    if tests.empty:
        return pd.Series(dtype=object)
    rows = tests[
        (tests["family"].astype(str) == "between-pairs")
        & (tests["layer"].astype(str) == layer)
        & (tests["pair"].astype(str) == pair)
    ]
    test = "kruskal" if len(cohorts) >= 3 else "mannwhitneyu"
    rows = rows[rows["test"].astype(str) == test]
    return rows.iloc[0] if len(rows) else pd.Series(dtype=object)


def _test_title(row: pd.Series) -> str:
    if row.empty:
        return "no between-cohort test recorded"
    name = {"mannwhitneyu": "Mann-Whitney", "kruskal": "Kruskal-Wallis"}.get(
        str(row["test"]), str(row["test"])
    )
    if str(row["status"]) != "ok":
        return f"{name} skipped: {row['reason']}"
    return (
        f"{name}: q = {float(row['q_value']):.3g}\n"
        f"{row['effect_name']} = {float(row['effect_size']):+.2f}"
    )


def fig_distributions(
    similarity: pd.DataFrame,
    tests: pd.DataFrame,
    layer: str,
    pairs: Sequence[tuple[str, str]],
    cohorts: Sequence[str],
    colours: Mapping[str, str],
) -> Figure:
    """Cosines of each region pair at one layer, per cohort: strip + box."""
    fig = _new_figure(0.4 + 3.1 * len(pairs), 3.5)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    rows = similarity[similarity["layer"].astype(str) == layer]
    rng = np.random.default_rng(0)
    for ax, (a, b) in zip(axes, pairs, strict=True):
        pair_rows = rows[(rows["region_a"] == a) & (rows["region_b"] == b)]
        data, positions = [], []
        for k, cohort in enumerate(cohorts):
            x = pair_rows.loc[pair_rows["cohort"].astype(str) == cohort, "cosine"].to_numpy(
                dtype=np.float64
            )
            x = x[np.isfinite(x)]
            if x.size:
                data.append(x)
                positions.append(k)
                jitter = rng.uniform(-0.17, 0.17, size=x.size)
                ax.scatter(
                    k + jitter,
                    x,
                    s=11,
                    alpha=0.75,
                    color=colours[cohort],
                    edgecolors="none",
                    zorder=3,
                    rasterized=False,
                )
        if data:
            ax.boxplot(
                data,
                positions=positions,
                widths=0.55,
                showfliers=False,
                medianprops={"color": "black", "linewidth": 1.4},
                boxprops={"color": "0.35"},
                whiskerprops={"color": "0.35"},
                capprops={"color": "0.35"},
                zorder=2,
            )
        ax.set_xticks(range(len(cohorts)), list(cohorts))
        ax.set_xlim(-0.6, len(cohorts) - 0.4)
        ax.ticklabel_format(axis="y", useOffset=False)
        row = _between_row(tests, layer, pair_label(a, b), cohorts)
        ax.set_title(f"{pair_label(a, b)}\n{_test_title(row)}")
        ax.grid(axis="y", color="0.92", zorder=0)
    axes[0].set_ylabel(f"cosine at {layer}")
    return fig


def layer_depth_order(layers: Sequence[str], run: Mapping[str, Any]) -> list[str]:
    """Layers from shallow to deep, by the forward rank run.json records (else as given)."""
    rank: dict[str, int] = {
        str(info.get("layer")): info["rank"]
        for info in run.get("layers", []) or []
        if isinstance(info, Mapping) and isinstance(info.get("rank"), int)
    }
    if all(layer in rank for layer in layers):
        return sorted(layers, key=lambda layer: rank[layer])
    return list(layers)


def fig_depth(
    summary: pd.DataFrame,
    layers: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    cohorts: Sequence[str],
    level: float,
) -> Figure:
    """Cohort mean cosine per pair across layers (shallow to deep) with bootstrap CI bands."""
    fig = _new_figure(0.6 + 3.3 * len(cohorts), 3.3)
    axes = fig.subplots(1, len(cohorts), squeeze=False, sharey=True)[0]
    x = np.arange(len(layers))
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
    for ax, cohort in zip(axes, cohorts, strict=True):
        for k, (a, b) in enumerate(pairs):
            rows = (
                summary[
                    (summary["cohort"] == cohort)
                    & (summary["region_a"] == a)
                    & (summary["region_b"] == b)
                ]
                .set_index("layer")
                .reindex(list(layers))
            )
            colour = palette[k % len(palette)]
            mean = rows["mean"].to_numpy(dtype=np.float64)
            ax.plot(x, mean, marker="o", ms=4, color=colour, label=pair_label(a, b))
            ax.fill_between(
                x,
                rows["ci_low"].to_numpy(dtype=np.float64),
                rows["ci_high"].to_numpy(dtype=np.float64),
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
        n = int(summary.loc[summary["cohort"] == cohort, "n"].max()) if len(summary) else 0
        ax.set_title(f"{cohort} (n = {n})")
        ax.set_xticks(x, list(layers))
        ax.set_xlabel("layer (shallow → deep)")
        ax.grid(axis="y", color="0.92")
    axes[0].set_ylabel(f"mean cosine ({level:.0%} bootstrap CI)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center")
    return fig


def pca_2d(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal-component scores of the rows, and their explained variance shares.

    Plain SVD of the centred matrix; each component's sign is fixed so that its
    largest loading is positive. Fewer than two components give zero columns.
    """
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    total = float((s**2).sum())
    scores = np.zeros((matrix.shape[0], 2))
    share = np.zeros(2)
    for k in range(min(2, s.size)):
        sign = 1.0 if vt[k, np.argmax(np.abs(vt[k]))] >= 0 else -1.0
        scores[:, k] = sign * u[:, k] * s[k]
        share[k] = float(s[k] ** 2) / total if total > 0 else 0.0
    return scores, share


def fig_pca(
    features: pd.DataFrame,
    layers: Sequence[str],
    regions: Sequence[str],
    colours: Mapping[str, str],
) -> Figure:
    """Feature vectors of every subject and region, PCA to 2D, one panel per layer."""
    fig = _new_figure(0.8 + 3.4 * len(layers), 3.6)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    markers = {r: _MARKERS[i % len(_MARKERS)] for i, r in enumerate(regions)}
    for ax, layer in zip(axes, layers, strict=True):
        rows = features[features["layer"].astype(str) == layer]
        matrix = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in rows["vector"]])
        finite = np.isfinite(matrix).all(axis=1)
        rows, matrix = rows.iloc[np.flatnonzero(finite)], matrix[finite]
        scores, share = pca_2d(matrix)
        cohort_of = rows["cohort"].astype(str).to_numpy()
        region_of = rows["region"].astype(str).to_numpy()
        for cohort in sorted(colours):
            for region in regions:
                keep = (cohort_of == cohort) & (region_of == region)
                if keep.any():
                    ax.scatter(
                        scores[keep, 0],
                        scores[keep, 1],
                        s=16,
                        marker=markers[region],
                        color=colours[cohort],
                        alpha=0.75,
                        edgecolors="none",
                    )
        dropped = int((~finite).sum())
        ax.set_title(f"{layer}" + (f" ({dropped} non-finite vectors left out)" if dropped else ""))
        ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.0%})")
        ax.grid(color="0.94")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker="o", color=colours[c], label=c) for c in sorted(colours)
    ]
    handles += [Line2D([], [], ls="", marker=markers[r], color="0.3", label=r) for r in regions]
    fig.legend(handles=handles, loc="outside right center")
    return fig


@dataclass(frozen=True)
class Slice:
    """A coronal slice of one subject: image, label values and region names."""

    subject_id: str
    cohort: str
    image: np.ndarray  # (D, W) HU, D inferior -> superior, W left -> right
    labels: np.ndarray  # (D, W) mask values
    names: tuple[tuple[str, int], ...]  # (region name, mask value) in label order
    aspect: float  # spacing D / spacing W
    index: int  # H index of the slice
    depth: int  # H size


def load_slice(
    subject_id: str,
    cohort: str,
    image: Path,
    mask: Path,
    names: tuple[tuple[str, int | None], ...],
    series_uid: str | None = None,
) -> Slice:
    """The coronal slice through the middle of the labelled voxels (RAS+, (D, H, W)).

    ``mask`` is any mask the pipeline reads (a label-map file with
    ``name=value`` names, a folder of binary masks or a ``.seg.nrrd`` with bare
    names); each named region is drawn on the image grid (a mask on another
    grid by nearest neighbour). Where regions overlap, the later one is drawn.
    """
    from cohort.config import PreprocessConfig
    from cohort.inputs.geometry import align_pair, dhw_grid, same_grid, select_regions, to_dhw
    from cohort.inputs.nearest import nearest_onto
    from cohort.inputs.readers import load_pair

    cfg = PreprocessConfig()
    pair = load_pair(image, mask, cfg, names, series_uid=series_uid)
    pair = align_pair(pair, cfg.affine_tolerance_mm)
    hu, spacing = to_dhw(pair.image.data, pair.image.affine)
    image_grid = dhw_grid(pair.image.shape, pair.image.affine)
    mask_grid = dhw_grid(pair.regions.shape, pair.regions.affine)
    on_grid = same_grid(image_grid, mask_grid, cfg.affine_tolerance_mm)
    masks = []
    for _, stored in select_regions(pair.regions, names):
        region, _ = to_dhw(stored, pair.regions.affine)
        if not on_grid:
            region = nearest_onto(region, mask_grid.affine, image_grid.shape, image_grid.affine, 0)
        masks.append(region)
    named = np.any(np.stack(masks), axis=0)
    along_h = np.flatnonzero(named.any(axis=(0, 2)))
    h = int((along_h[0] + along_h[-1]) // 2) if along_h.size else named.shape[1] // 2
    values = tuple(k + 1 if value is None else value for k, (_, value) in enumerate(names))
    labels = np.zeros((named.shape[0], named.shape[2]), dtype=np.int64)
    for region, value in zip(masks, values, strict=True):
        labels[region[:, h, :]] = value
    return Slice(
        subject_id,
        cohort,
        np.asarray(hu[:, h, :], dtype=np.float32),
        labels,
        tuple((name, value) for (name, _), value in zip(names, values, strict=True)),
        spacing[0] / spacing[2],
        h,
        int(named.shape[1]),
    )


def fig_overlays(slices: Sequence[Slice]) -> Figure:
    """Image with its region masks, one panel per cohort."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    region_colours = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628")
    heights = [s.image.shape[0] * s.aspect / s.image.shape[1] for s in slices]
    fig = _new_figure(0.3 + 3.0 * len(slices), 1.0 + 2.6 * min(max(heights), 1.2))
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, s in zip(axes, slices, strict=True):
        finite = s.image[np.isfinite(s.image)]
        low, high = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
        ax.imshow(s.image, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=s.aspect)
        handles = []
        for k, (name, value) in enumerate(s.names):
            colour = region_colours[k % len(region_colours)]
            where = s.labels == value
            if not where.any():
                continue
            overlay = np.ma.masked_where(~where, np.ones(where.shape))
            ax.imshow(
                overlay,
                cmap=ListedColormap([colour]),
                alpha=0.35,
                origin="lower",
                aspect=s.aspect,
                interpolation="nearest",
            )
            ax.contour(where.astype(float), levels=[0.5], colors=[colour], linewidths=0.9)
            handles.append(Patch(color=colour, alpha=0.6, label=f"{name} (label {value})"))
        ax.set_title(f"{s.cohort}: {s.subject_id} (coronal {s.index + 1}/{s.depth})")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        for text, x, y, ha, va in (
            ("S", 0.5, 0.99, "center", "top"),
            ("I", 0.5, 0.01, "center", "bottom"),
            ("L", 0.01, 0.5, "left", "center"),
            ("R", 0.99, 0.5, "right", "center"),
        ):
            ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=8)
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncols=2)
    return fig
