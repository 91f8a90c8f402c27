"""The first subject of a manifest run through the core functions in this process:
the reference a Ray run's masked-input vectors are compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cohort.config import ModelConfig, PoolingConfig, PreprocessConfig
from cohort.inputs.manifest import read_manifest
from cohort.inputs.stages import prepare
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import extract

LABELS = (("tibia", 1), ("femur", 2))


def direct_masked_input(
    name: str, manifest: Path, cfg: PreprocessConfig, air: float | None = None
) -> tuple[str, Any, list[Any]]:
    """(subject id, its model input, its masked-input vectors) with seed-0 random
    weights; ``air`` replaces the prepared input's own air value when given."""
    subject = read_manifest(manifest)[0]
    prepared = prepare(subject.image, subject.mask, LABELS, True, cfg)
    network, _ = build_network(name, random_weights(name, 0).state_dict)
    extractor = FeatureExtractor(network, resolve_layers(network, ModelConfig().layers))
    vectors = extract(
        extractor,
        torch.from_numpy(prepared.image),
        torch.from_numpy(prepared.region_index),
        prepared.region_names,
        PoolingConfig(mode="masked-input"),
        prepared.air if air is None else air,
    )
    return subject.subject_id, prepared, list(vectors)
