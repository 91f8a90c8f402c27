"""What the driver checks before any subject is read: manifest, weights, layers, reach.

Imports the model stack (torch): the driver runs :func:`prepare_run` in a
thread while Ray starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohort.config import LabelMap, ModelConfig, RunConfig, format_label_map
from cohort.execution.adjust import check_run, manifest_extras
from cohort.inputs.fingerprint import options_identity
from cohort.inputs.geometry import Reach
from cohort.inputs.headers import InputSizes, scan_sizes
from cohort.inputs.manifest import Subject, read_manifest
from cohort.model.hooks import LayerInfo, resolve_layers
from cohort.model.network import (
    Weights,
    architecture,
    build_network,
    load_weights,
    random_weights,
)
from cohort.model.reach import layer_reach

__all__ = ["Plan", "network_reach", "prepare_run", "stream_rows", "subject_labels"]


def subject_labels(subject: Subject, cfg: RunConfig) -> LabelMap:
    return subject.labels if subject.labels is not None else cfg.regions.labels


@dataclass(frozen=True)
class Plan:
    """What the driver checked before Ray starts."""

    manifest: Path
    subjects: tuple[Subject, ...]
    weights: Weights
    layers: tuple[LayerInfo, ...]
    identity: str
    reach: Reach | None = None  # least model input of each hooked layer (for the loaders)
    architecture: str = ""  # the library and version that define the network
    sizes: InputSizes | None = None  # the largest model inputs, from the image headers
    # the network the layers were resolved on: an in-process run computes with it
    network: Any = field(default=None, repr=False, compare=False)


def prepare_run(
    manifest: Path,
    cfg: RunConfig,
    *,
    download: bool = True,
    subjects: tuple[Subject, ...] | None = None,
) -> Plan:
    """Everything checked on the driver before Ray starts: manifest, weights, layers.
    ``subjects``: the manifest's, when the caller has read it already."""
    if subjects is None:
        subjects = read_manifest(manifest, manifest_extras(cfg.adjust))
    check_run(subjects, Path(manifest), cfg.adjust)  # covariates, strata, batch: before any work
    with ThreadPoolExecutor(max_workers=1) as pool:  # headers read while the network is built
        sizing = pool.submit(scan_sizes, [s.image for s in subjects], cfg.preprocess)
        weights = load_weights(cfg.model, download=download)
        network, _ = build_network(cfg.model.backbone, weights.state_dict, cfg.model.inflation)
        layers = resolve_layers(network, cfg.model.layers)
        sizes = sizing.result()
    return Plan(
        Path(manifest).resolve(),
        subjects,
        weights,
        layers,
        options_identity(cfg, weights.sha256),
        layer_reach(network, layers),
        architecture(cfg.model.backbone),
        sizes,
        network,
    )


def network_reach(model: ModelConfig) -> Reach:
    """The least model input of each layer ``model`` hooks, from the architecture alone:
    the network is built with seeded random weights (no download; the weights do not
    change a feature map's size). Refuses layers the network does not have, as a run
    does."""
    weights = random_weights(model.backbone, 0)
    network, _ = build_network(model.backbone, weights.state_dict, model.inflation)
    return layer_reach(network, resolve_layers(network, model.layers))


def stream_rows(subjects: Sequence[Subject], cfg: RunConfig) -> list[dict[str, Any]]:
    return [
        {
            "subject_id": s.subject_id,
            "cohort": s.cohort,
            "image": str(s.image),
            "mask": str(s.mask),
            "labels": format_label_map(subject_labels(s, cfg)),
            "series_uid": s.series_uid or "",
        }
        for s in subjects
    ]
