"""The resume key covers exactly the options that change a subject's numbers.

Every field of every config is classified in cohort.inputs.fingerprint (in the
key or out of it, with a reason). This test walks the configs, so a new field
fails here until it is classified, and it changes each field to another valid
value: the key must move for the fields in the key and only for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from cohort.config import RunConfig
from cohort.inputs.fingerprint import IN_KEY, OUT_OF_KEY, options_identity

pytestmark = pytest.mark.timeout(60)

WEIGHTS = "w" * 64

# another valid value for every field (keyed by dotted path)
OTHER: dict[str, Any] = {
    "preprocess.hu_min": -500.0,
    "preprocess.hu_max": 1500.0,
    "preprocess.preset": "ct-fm",
    "preprocess.normalise": "foreground",
    "preprocess.foreground_hu": -100.0,
    "preprocess.axes": "SPL",
    "preprocess.mean": 0.5,
    "preprocess.std": 0.25,
    "preprocess.target_spacing": (2.0, 1.0, 1.0),
    "preprocess.crop_margin_mm": 10.0,
    "preprocess.affine_tolerance_mm": 0.01,
    "preprocess.max_voxels": 1000,
    "preprocess.mask_resample": "nearest",
    "regions.labels": (("femur", 1), ("tibia", 2)),
    "regions.background": False,
    "model.backbone": "resnet18",
    "model.weights": "random",
    "model.seed": 3,
    "model.inflation": "centre",
    "model.layers": ("conv-1",),
    "model.weights_sha256": "ab" * 32,
    "model.precision": "bf16",
    "pooling.mode": "masked-input",
    "pooling.gem_p": 4.0,
    "pooling.min_coverage": 0.5,
    "execution.device": "cuda",
    "execution.address": "auto",
    "execution.executor": "in-process",
    "execution.num_actors": 3,
    "execution.actor_cpus": 0.1,
    "execution.loader_cpus": 1.0,
    "execution.torch_threads": 1,
    "execution.progress": "quiet",
    "execution.stall_timeout_s": 30.0,
    "execution.max_retries": 0,
    "execution.actor_memory_gb": 8.0,
    "stats.bootstrap": 10,
    "stats.permutations": 9,
    "stats.seed": 4,
    "stats.alpha": 0.01,
    "stats.min_n": 5,
    "stats.centre": True,
    "stats.ci_level": 0.9,
    "adjust.covariates": ("age", "sex"),
    "adjust.strata": "site",
    "adjust.harmonise": "scanner",
    "adjust.harmonise_with": "old-run",
    "adjust.drop_incomplete": True,
    "adjust.subjects_table": "subjects.csv",
}


def field_paths(config: Any, prefix: str = "") -> Iterator[str]:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            yield from field_paths(value, f"{path}.")
        else:
            yield path


def changed(path: str, value: Any, base: RunConfig | None = None) -> RunConfig:
    section, name = path.split(".")
    base = base or RunConfig()
    return dataclasses.replace(
        base, **{section: dataclasses.replace(getattr(base, section), **{name: value})}
    )


def test_every_field_is_classified_once_with_a_reason() -> None:
    paths = list(field_paths(RunConfig()))
    assert len(paths) > 30  # the walk reached every section
    both = set(IN_KEY) & set(OUT_OF_KEY)
    assert not both, both
    unclassified = [p for p in paths if p not in IN_KEY and p not in OUT_OF_KEY]
    assert not unclassified, f"classify these in cohort/inputs/fingerprint.py: {unclassified}"
    stale = (set(IN_KEY) | set(OUT_OF_KEY)) - set(paths)
    assert not stale, stale
    for path in paths:
        reason = IN_KEY.get(path) or OUT_OF_KEY.get(path)
        assert reason and len(reason) > 10, path
    assert set(OTHER) == set(paths)  # this test knows another value for each


@pytest.mark.parametrize("path", sorted(OTHER))
def test_key_moves_exactly_for_the_fields_in_it(path: str) -> None:
    base = options_identity(RunConfig(), WEIGHTS)
    key = options_identity(changed(path, OTHER[path]), WEIGHTS)
    if path == "pooling.gem_p":  # used, and in the key, only by masked-gem
        assert key == base
        gem = changed("pooling.mode", "masked-gem")
        assert options_identity(changed(path, 4.0, gem), WEIGHTS) != options_identity(gem, WEIGHTS)
    elif path in IN_KEY:
        assert key != base, path
    else:
        assert key == base, path


def test_weights_hash_is_in_the_key() -> None:
    assert options_identity(RunConfig(), WEIGHTS) != options_identity(RunConfig(), "v" * 64)
