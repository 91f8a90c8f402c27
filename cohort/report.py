"""The report: one self-contained ``report.html`` of a result folder, plus each figure.

:func:`write_report` reads a finished run's folder (``run.json``,
``features.parquet``, ``similarity.parquet``, ``stats.parquet``,
``errors.parquet``) and writes into ``<folder>/report`` (or ``out``):

- ``report.html``: every figure embedded as a base64 PNG, every table as plain
  HTML, no network needed to open it (a tiny inline script makes the tables
  sortable and records on ``<body>`` how many images loaded);
- ``<figure>.png`` and ``<figure>.svg`` for each figure, for a paper.

Figures (matplotlib, no pyplot state): the origin study's table as a heatmap
per cohort; per layer the cosines of each region pair per cohort (strip + box)
with the between-cohort test's q-value; cohort means across depth with
bootstrap CI bands; a PCA embedding of the feature vectors per layer; one
mid-slice overlay of image and region masks per cohort. Then the tests with
their sanity flags, every subject of the run (done and failed, with robust
outliers), the errors and the run's provenance.

A run with one cohort leaves out the between-cohort plots and says why; a
missing or unreadable manifest leaves out the overlays and says why.

:func:`synthetic_results` writes a result folder with known content and no
model, for tests, benchmarks and trying the report.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cohort import stats
from cohort.config import BACKGROUND, StatsConfig
from cohort.errors import CohortError
from cohort.outputs import store

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_DIR: Final = "report"
REPORT_FILE: Final = "report.html"
DPI: Final = 120
OUTLIER_Z: Final = 3.5  # robust z (median / MAD) beyond which a cosine marks an outlier
_MARKERS: Final = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_NAN_TEXT: Final = "–"


class ReportError(CohortError, ValueError):
    """A folder cannot be reported on (not a finished run, unreadable files)."""


# --------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Results:
    """A result folder read into memory."""

    folder: Path
    run: dict[str, Any]  # run.json
    features: pd.DataFrame  # features.parquet (may be empty)
    similarity: pd.DataFrame  # the cosines the tests used (centred when the run centred)
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


def stats_config(run: Mapping[str, Any]) -> StatsConfig:
    """The run's StatsConfig from run.json (defaults for what it does not say)."""
    saved = dict(run.get("config", {}).get("stats", {}) or {})
    names = {f.name for f in dataclasses.fields(StatsConfig)}
    return StatsConfig(**{k: v for k, v in saved.items() if k in names})


def read_results(folder: Path) -> Results:
    """Read a result folder; raises :class:`ReportError` when it is not one."""
    folder = Path(folder)
    run_json = folder / "run.json"
    if not run_json.is_file():
        raise ReportError(
            f"{run_json} is missing; FOLDER must be the --out folder of a finished `cohort run`"
        )
    try:
        run = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{run_json} is not readable JSON ({err}); rerun the analysis") from None
    notes: list[str] = []
    features = _read_table(folder / "features.parquet", stats.FEATURE_COLUMNS, notes)
    similarity = _read_table(folder / "similarity.parquet", stats.SIMILARITY_COLUMNS, notes)
    tests = _read_table(folder / "stats.parquet", stats.TEST_COLUMNS, notes)
    errors = _read_table(folder / "errors.parquet", store.ERRORS_SCHEMA.names, notes)
    cfg = stats_config(run)
    if cfg.centre and len(features):
        similarity = stats.cosine_table(features, centre=True)
    similarity = similarity.assign(cosine=similarity["cosine"].astype(np.float64))
    return Results(folder, run, features, similarity, tests, errors, cfg, cfg.centre, tuple(notes))


# ------------------------------------------------------------------ figures


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


def _style() -> None:
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


def _save(fig: Figure, out: Path, name: str, alt: str, caption: str) -> Figured:
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


def _pair(a: str, b: str) -> str:
    return f"{a}-{b}"


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
        row = _between_row(tests, layer, _pair(a, b), cohorts)
        ax.set_title(f"{_pair(a, b)}\n{_test_title(row)}")
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
            ax.plot(x, mean, marker="o", ms=4, color=colour, label=_pair(a, b))
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
    names: tuple[tuple[str, int], ...],
) -> Slice:
    """The coronal slice through the middle of the labelled voxels (RAS+, (D, H, W))."""
    from cohort.config import PreprocessConfig
    from cohort.inputs.geometry import to_dhw
    from cohort.inputs.readers import load_pair

    pair = load_pair(image, mask, PreprocessConfig())
    hu, spacing = to_dhw(pair.image, pair.image_affine)
    labels, _ = to_dhw(pair.mask, pair.image_affine)
    named = np.isin(labels, [value for _, value in names])
    along_h = np.flatnonzero(named.any(axis=(0, 2)))
    h = int((along_h[0] + along_h[-1]) // 2) if along_h.size else labels.shape[1] // 2
    return Slice(
        subject_id,
        cohort,
        np.asarray(hu[:, h, :], dtype=np.float32),
        np.asarray(labels[:, h, :]),
        names,
        spacing[0] / spacing[2],
        h,
        int(labels.shape[1]),
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


# --------------------------------------------------------------- subjects


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


# ------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object, digits: int = 4, fixed: bool = False) -> tuple[str, str]:
    """(text, sort key) of a cell: ``digits`` significant digits, or decimals when ``fixed``."""
    if isinstance(value, bool | np.bool_):
        return str(value), ""
    if isinstance(value, int | np.integer):
        return f"{int(value):,}", str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return _NAN_TEXT, ""
        return (f"{v:.{digits}f}" if fixed else f"{v:.{digits}g}"), repr(v)
    return str(value), ""


def html_table(
    frame: pd.DataFrame,
    *,
    digits: Mapping[str, int] | None = None,
    row_class: Sequence[str] | None = None,
    table_id: str = "",
    sortable: bool = True,
    fixed: bool = False,
) -> str:
    """A plain HTML table; numeric cells carry ``data-v`` for sorting.

    ``digits`` maps a column to its significant digits (decimals when ``fixed``).
    """
    digits = digits or {}
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for column, value in zip(frame.columns, row, strict=True):
            text, key = _number(value, digits.get(str(column), 4), fixed)
            attr = f' data-v="{_e(key)}"' if key else ""
            cells.append(f"<td{attr}>{_e(text)}</td>")
        cls = row_class[i] if row_class is not None and row_class[i] else ""
        body.append(f'<tr class="{cls}">' if cls else "<tr>")
        body.append("".join(cells) + "</tr>")
    classes = "data sortable" if sortable else "data"
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return (
        f'<div class="scroll"><table class="{classes}"{ident}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _figure_html(fig: Figured) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{_e(fig.name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(fig.alt)}"><figcaption>{fig.caption} '
        f'<span class="files">Files: <a href="{_e(fig.name)}.png">{_e(fig.name)}.png</a>, '
        f'<a href="{_e(fig.name)}.svg">{_e(fig.name)}.svg</a></span></figcaption></figure>'
    )


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{text}</p>' if cls else f"<p>{text}</p>"


_CSS: Final = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0;color:#1d2430;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 8px;
border-bottom:1px solid #e3e6ea;padding-bottom:4px}h3{font-size:16px;margin:20px 0 6px}
.lede{color:#4a5361;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #e3e6ea;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.card span{color:#5b6472;font-size:13px}
.card.bad b{color:#b42318}
nav{font-size:14px;margin:8px 0 0}nav a{margin-right:14px;color:#2456a6}
figure{margin:12px 0 22px}figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#4a5361;margin-top:4px}.files{color:#7a8391}
.note{background:#f4f6fa;border-left:4px solid #8aa4d6;padding:8px 12px;border-radius:4px}
.warn{background:#fff4e5;border-left:4px solid #f5a524;padding:8px 12px;border-radius:4px}
.scroll{overflow-x:auto;max-height:560px;overflow-y:auto;border:1px solid #e3e6ea;
border-radius:6px}
table.data{border-collapse:collapse;font-size:13px;width:100%}
table.data th,table.data td{padding:4px 8px;border-bottom:1px solid #eef0f3;text-align:left;
white-space:nowrap}
table.data td[data-v]{text-align:right;font-variant-numeric:tabular-nums}
table.data th{background:#f6f7f9;position:sticky;top:0}
table.sortable th{cursor:pointer}table.sortable th[data-dir=asc]::after{content:" ▲"}
table.sortable th[data-dir=desc]::after{content:" ▼"}
tr.flagged td{background:#fff4d6}tr.flagged td:last-child{color:#9a3412;font-weight:600}
tr.failed td{background:#fde8e8}tr.outlier td{background:#fff4d6}
tr.sig td:nth-child(10){font-weight:700}
td.msg{white-space:normal}
pre{background:#f6f7f9;padding:10px;border-radius:6px;overflow-x:auto;font-size:12px}
.subjects{columns:4 180px;font-size:13px;margin:6px 0 0;padding:0;list-style:none}
"""

# Records how many images loaded and any script or resource errors on <body>, so a
# headless browser's --dump-dom can check the page; makes tables sortable.
_SCRIPT_HEAD: Final = """
window.cohortErrors=[];
window.addEventListener('error',function(e){var t=e.target;
window.cohortErrors.push(t&&t.tagName?('resource '+t.tagName):String(e.message));},true);
"""
_SCRIPT_BODY: Final = """
(function(){
function key(td){var v=td.dataset.v!==undefined?td.dataset.v:td.textContent.trim();
var n=v===''?NaN:Number(v);return isNaN(n)?[1,v.toLowerCase()]:[0,n];}
document.querySelectorAll('table.sortable').forEach(function(table){
table.querySelectorAll('th').forEach(function(th){th.addEventListener('click',function(){
var i=th.cellIndex,asc=th.dataset.dir!=='asc',body=table.tBodies[0];
table.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});
th.dataset.dir=asc?'asc':'desc';
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
if(x[0]!==y[0])return x[0]-y[0];var c=x[1]<y[1]?-1:x[1]>y[1]?1:0;return asc?c:-c;});
rows.forEach(function(r){body.appendChild(r);});});});});
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
document.body.dataset.imagesTotal=imgs.length;document.body.dataset.imagesLoaded=ok;
document.body.dataset.pageErrors=window.cohortErrors.length;
document.body.dataset.errorText=window.cohortErrors.join(' | ');
document.body.dataset.ready='1';});
})();
"""


# ---------------------------------------------------------------- the page


@dataclass
class _Page:
    out: Path
    sections: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figured] = field(default_factory=list)

    def section(self, anchor: str, title: str, *parts: str) -> None:
        self.toc.append((anchor, title))
        self.sections.append(
            f'<section id="{anchor}"><h2>{_e(title)}</h2>{"".join(parts)}</section>'
        )

    def figure(self, fig: Figure, name: str, alt: str, caption: str) -> str:
        saved = _save(fig, self.out, name, alt, caption)
        self.figures.append(saved)
        return _figure_html(saved)


def _manifest_subjects(run: Mapping[str, Any]) -> tuple[list[Any], str]:
    """The manifest's subjects, or [] and a sentence saying why they cannot be read."""
    from cohort.inputs.manifest import read_manifest

    path = run.get("manifest")
    if not path:
        return [], "run.json does not record the manifest's path (runs before cohort 0.1 did not)"
    try:
        return list(read_manifest(Path(str(path)))), ""
    except CohortError as err:
        return [], f"the manifest {_e(path)} cannot be read now ({_e(err)})"


def _region_names(run: Mapping[str, Any], subject: Any) -> tuple[tuple[str, int], ...]:
    if getattr(subject, "labels", None):
        return tuple((str(n), int(v)) for n, v in subject.labels)
    labels = run.get("config", {}).get("regions", {}).get("labels") or [["tibia", 1], ["femur", 2]]
    return tuple((str(n), int(v)) for n, v in labels)


def _overlay_section(page: _Page, results: Results) -> str:
    subjects, why = _manifest_subjects(results.run)
    if why:
        return _p(f"No image overlay: {why}.", "note")
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
                        _region_names(results.run, subject),
                    )
                )
                break
            except (CohortError, OSError) as err:
                problems.append(f"{_e(subject.subject_id)}: {_e(err)}")
        else:
            problems.append(f"cohort {_e(cohort)}: no finished subject's files could be read")
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
            caption += f" The region <i>{_e(background)}</i> is every voxel in no named label."
        parts.append(
            page.figure(
                fig_overlays(slices),
                "overlay",
                "Mid-slice of one subject per cohort with region masks",
                caption,
            )
        )
    if problems:
        parts.append(_p("Overlay problems: " + "; ".join(problems) + ".", "warn"))
    return "".join(parts)


def _cards(results: Results, subjects: pd.DataFrame) -> str:
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
            f'<div class="card {cls}"><b>{_e(v)}</b><span>{_e(label)}</span></div>'
            for v, label, cls in items
        )
        + "</div>"
    )


def _stats_section(results: Results) -> str:
    tests = results.tests
    if tests.empty:
        return _p("No tests were recorded (stats.parquet is empty or missing).", "note")
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
        _p(
            f"{len(tests)} tests, {int((tests['status'] == 'ok').sum())} ran. q_value is the "
            "Benjamini-Hochberg adjusted p-value within the test's family, q_value_run over "
            f"every test of the run; q ≤ {alpha:g} is bold. CIs are seeded percentile "
            f"bootstrap intervals ({results.stats_cfg.ci_level:.0%}) of the effect size. "
            "Click a column heading to sort."
        ),
        _p(
            f"<b>{n_flagged}</b> row(s) carry a sanity flag (highlighted; see the list below)."
            if n_flagged
            else "No test carries a sanity flag.",
            "warn" if n_flagged else "note",
        ),
        html_table(
            tests[list(stats.TEST_COLUMNS)],
            digits={"p_value": 3, "q_value": 3, "q_value_run": 3},
            row_class=classes,
            table_id="stats",
        ),
    ]
    parts.append("<h3>Sanity flags</h3>")
    if flags.empty:
        parts.append(
            _p(
                "None: no cosine of exactly 1, no NaN cosine, no zero or non-finite vector, "
                "no two layers with identical vectors."
            )
        )
    else:
        shown = flags.head(500)
        more = f" (first 500 of {len(flags)})" if len(flags) > 500 else ""
        parts.append(_p(f"{len(flags)} suspicious value(s){more}:"))
        parts.append(html_table(shown, row_class=["flagged"] * len(shown), table_id="flags"))
    return "".join(parts)


def _errors_section(results: Results) -> str:
    errors = results.errors
    if errors.empty:
        return _p("No subject failed.", "note")
    frame = errors[["subject_id", "cohort", "stage", "error_type", "message", "image", "mask"]]
    table = html_table(frame.astype(str), row_class=["failed"] * len(frame), table_id="errors")
    table = table.replace("<td>", '<td class="msg">')
    return (
        _p(
            f"{len(errors)} subject(s) failed; their results are not in the tables and figures "
            "above. Fix the cause (the message says how) and rerun: finished subjects are reused.",
            "warn",
        )
        + table
    )


def _provenance_section(run: Mapping[str, Any]) -> str:
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
    parts.append(f"<pre>{_e(json.dumps(run.get('config', {}), indent=2, sort_keys=True))}</pre>")
    return "".join(parts)


def write_report(results: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` and every figure (PNG + SVG) for the run in ``results``.

    ``out`` defaults to ``results / "report"``. Returns the path of report.html.
    Raises :class:`ReportError` when ``results`` is not a finished run's folder.
    """
    data = read_results(Path(results))
    out = Path(out) if out is not None else Path(results) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    _style()
    page = _Page(out)
    subjects_manifest, _ = _manifest_subjects(data.run)
    subjects = subjects_table(data, [s.subject_id for s in subjects_manifest])
    cohorts = data.done_cohorts
    colours = cohort_colours(data.cohorts)
    layers, pairs = data.layers, data.pairs
    has_cosines = not data.similarity.empty
    no_cosines = _p(
        "No subject finished, so there are no cosines to show; see the errors below.", "warn"
    )
    centred_note = (
        " Cosines are <b>centred</b>: computed after subtracting the pooled mean vector of each "
        "layer (the run's --centre), so they are not comparable with raw cosines."
        if data.centred
        else ""
    )

    # 1. the origin study's table
    if has_cosines:
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
    else:
        page.section("table", "Similarity table", no_cosines)

    # 2. distributions per layer (between cohorts)
    if not has_cosines:
        page.section("distributions", "Cosines per cohort", no_cosines)
    elif len(cohorts) < 2:
        page.section(
            "distributions",
            "Cosines per cohort",
            _p(
                f"This run has one cohort ({_e(cohorts[0])}), so the between-cohort plots "
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
                f"<b>{_e(layer)}</b>: each dot is one subject's cosine between two regions; "
                f"boxes show median and quartiles. Titles give the two-sided {test} test "
                "between cohorts (q: Benjamini-Hochberg within the between-pairs family) and "
                f"its effect size.{centred_note}",
            )
            for layer in layers
        ]
        page.section("distributions", "Cosines per cohort", *figs)

    # 3. across depth
    if has_cosines:
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
    else:
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
    page.section("regions", "What the regions are", _overlay_section(page, data))

    # 6. tests
    page.section("stats", "Statistical tests", _stats_section(data))

    # 7. subjects
    outliers = [bool(o) for o in subjects["outlier"]]
    row_class = [
        "failed" if s == "failed" else ("outlier" if o else "")
        for s, o in zip(subjects["status"], outliers, strict=True)
    ]
    page.section(
        "subjects",
        "Subjects",
        _p(
            f"All {len(subjects)} subjects of the run: done ones with their region sizes in "
            f"voxels, failed ones with the stage that failed. <i>outlier</i> lists cosines "
            f"whose robust z-score (median and MAD within cohort, layer and pair) exceeds "
            f"{OUTLIER_Z:g}: {sum(outliers)} subject(s)."
        ),
        html_table(subjects, row_class=row_class, table_id="subjects"),
    )

    # 8. errors, 9. provenance
    page.section("errors", "Errors", _errors_section(data))
    page.section("provenance", "Provenance", _provenance_section(data.run))

    path = out / REPORT_FILE
    tmp = store.atomic_path(path)
    tmp.write_text(_page_html(data, subjects, page), encoding="utf-8")
    tmp.replace(path)
    return path


def _page_html(results: Results, subjects: pd.DataFrame, page: _Page) -> str:
    weights = results.run.get("weights", {}) or {}
    title = f"cohort report: {results.folder.resolve().name}"
    notes = "".join(_p(_e(n) + ".", "warn") for n in results.notes)
    nav = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in page.toc)
    lede = (
        f"Result folder <code>{_e(results.folder.resolve())}</code>. Weights: "
        f"{_e(weights.get('detail') or weights.get('source', 'not recorded'))}. Cohorts: "
        f"{_e(', '.join(results.cohorts) or 'none')}."
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT_HEAD}</script>"
        f"</head><body><main><h1>{_e(title)}</h1>"
        f'<p class="lede">{lede}</p>{_cards(results, subjects)}<nav>{nav}</nav>{notes}'
        f"{''.join(page.sections)}</main><script>{_SCRIPT_BODY}</script></body></html>\n"
    )


# ----------------------------------------------------------------- command


@click.command("report")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Report folder [default: FOLDER/report].",
)
def report(folder: Path, out: Path | None) -> None:
    """Write report.html and its figures (PNG + SVG) for the finished run in FOLDER."""
    try:
        path = write_report(folder, out)
    except CohortError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"report: {path}")


# ------------------------------------------------------ synthetic results


def synthetic_results(
    folder: Path,
    *,
    n_per_cohort: int = 8,
    cohorts: Sequence[str] = ("control", "osteo"),
    layers: Sequence[str] = ("conv-1", "conv-3", "conv-5"),
    channels: int = 32,
    failed: int = 0,
    identical: int = 0,
    images: bool = True,
    cfg: StatsConfig | None = None,
    seed: int = 0,
) -> Path:
    """Write a result folder with known content and no model; returns ``folder``.

    Regions tibia, femur and background; each cohort's vectors are a shared
    direction per layer and region plus a cohort shift plus noise, made
    non-negative like ReLU outputs. Stats come from :func:`cohort.stats.run_tests`
    with ``cfg`` (default: 200 bootstrap resamples, 99 permutations). ``failed``
    extra subjects per cohort fail at ``load`` (their files do not exist).
    The first ``identical`` subjects of the first cohort get a femur vector
    equal to their tibia vector (a ``cosine-one`` sanity flag).
    With ``images``, one small phantom knee per cohort is written and every
    finished subject of that cohort points at it in ``manifest.csv``.
    """
    from cohort import __version__
    from cohort.config import RunConfig
    from cohort.inputs.manifest import Subject, write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or StatsConfig(bootstrap=200, permutations=99)
    rng = np.random.default_rng(seed)
    regions = ("tibia", "femur", BACKGROUND)
    base = {(layer, r): rng.gamma(2.0, 1.0, channels) for layer in layers for r in regions}
    records: list[dict[str, Any]] = []
    subjects: list[Subject] = []
    error_rows: list[dict[str, str]] = []
    data = folder / "data"
    for k, cohort in enumerate(cohorts):
        image, mask = data / f"{cohort}-image.nii.gz", data / f"{cohort}-mask.nii.gz"
        if images:
            from cohort.synthetic import cohort_effect, make_phantom_subject, write_phantom_nifti

            hu, label = make_phantom_subject((32, 48, 48), seed=seed + k, effect=cohort_effect(k))
            write_phantom_nifti(hu, label, (1.5, 0.8, 0.8), image, mask)
        shift = {key: rng.normal(0.0, 0.6 * k, channels) for key in base}
        for i in range(n_per_cohort):
            sid = f"{cohort}-{i + 1:03d}"
            subjects.append(Subject(sid, image, mask, cohort, None, len(subjects) + 1))
            for layer in layers:
                for region, voxels in zip(regions, (9000, 11000, 60000), strict=True):
                    noise = rng.normal(0.0, 0.5, channels)
                    vector = np.maximum(base[(layer, region)] + shift[(layer, region)] + noise, 0)
                    if region == "femur" and k == 0 and i < identical:
                        vector = records[-1]["vector"]
                    records.append(
                        {
                            "subject_id": sid,
                            "cohort": cohort,
                            "region": region,
                            "layer": layer,
                            "layer_name": f"features.synthetic.{layer}",
                            "channels": channels,
                            "voxels": voxels + int(rng.integers(-500, 500)),
                            "vector": vector.astype(np.float32),
                        }
                    )
        for j in range(failed):
            sid = f"{cohort}-F{j + 1:02d}"
            missing = data / f"{sid}-missing.nii.gz"
            subjects.append(Subject(sid, missing, missing, cohort, None, len(subjects) + 1))
            error_rows.append(
                {
                    "subject_id": sid,
                    "cohort": cohort,
                    "stage": "load",
                    "error_type": "FileNotFoundError",
                    "message": f"image file {missing} of subject {sid} does not exist; fix the "
                    "path in the manifest (relative paths start at its folder)",
                    "image": str(missing),
                    "mask": str(missing),
                }
            )
    manifest = write_manifest(subjects, folder / "manifest.csv")
    features = pd.DataFrame(records)
    similarity = stats.cosine_table(features)
    tests = stats.run_tests(features, similarity, cfg)
    config = RunConfig(stats=cfg).to_dict()
    done = len(subjects) - len(error_rows)
    provenance: dict[str, Any] = {
        "manifest": str(manifest.resolve()),
        "config": config,
        "versions": {"cohort": __version__, "numpy": np.__version__, "pandas": pd.__version__},
        "weights": {"source": "synthetic", "detail": "synthetic vectors (no model)", "sha256": ""},
        "layers": [
            {
                "layer": layer,
                "module_path": f"features.synthetic.{layer}",
                "channels": channels,
                "grid": [2, 2, 2],
                "rank": len(layers) - i,
            }
            for i, layer in enumerate(layers)
        ],
        "device": ["none (synthetic)"],
        "counts": {"subjects": len(subjects), "done": done, "cached": 0, "failed": len(error_rows)},
        "timings": {"total_s": 0.0},
        "background": BACKGROUND,
    }

    def with_meta(table: Any) -> Any:
        return table.replace_schema_metadata(
            store.with_provenance(table.schema, provenance).metadata
        )

    store.write_parquet(
        with_meta(store.table(features, store.FEATURES_SCHEMA)), folder / "features.parquet"
    )
    store.write_parquet(
        with_meta(store.table(similarity, store.SIMILARITY_SCHEMA)), folder / "similarity.parquet"
    )
    store.write_csv(stats.origin_table(similarity), folder / "similarity.csv")
    store.write_parquet(
        with_meta(store.pa.Table.from_pandas(tests, preserve_index=False)),
        folder / "stats.parquet",
    )
    store.write_csv(tests, folder / "stats.csv")
    errors = store.table(error_rows, store.ERRORS_SCHEMA)
    store.write_parquet(with_meta(errors), folder / "errors.parquet")
    store.write_csv(errors.to_pandas(), folder / "errors.csv")
    store.write_json(provenance, folder / "run.json")
    return folder
