"""Every option out of the resume key leaves a subject's vectors as they were, bit for bit.

``tests/test_resume.py`` checks that the key moves exactly for the fields listed in
it; that would pass with a field wrongly listed out of it. Here each field of
:data:`~cohort.inputs.fingerprint.OUT_OF_KEY` is changed, one run each, on the same
small cohort, and the run's parts (the vectors a rerun reuses) must equal those
of a run with the defaults: the same keys, the same float32 bits. Where the key
moves on purpose (the weights through their sha256, the torch threads through the
run's execution identity, the default label map through each subject's map), the
test says so and checks that the key did move.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cohort.config import (
    AdjustConfig,
    ExecutionConfig,
    ModelConfig,
    RunConfig,
    StatsConfig,
)
from cohort.execution import driver
from cohort.inputs.fingerprint import OUT_OF_KEY, config_value, sha256_file
from cohort.inputs.manifest import read_manifest, write_manifest
from cohort.model.network import random_weights
from cohort.outputs import store
from cohort.synthetic import make_phantom_cohort
from tests.test_resume import changed

pytestmark = pytest.mark.timeout(900)

SHAPE = (48, 64, 64)
BASE = RunConfig(
    model=ModelConfig(weights="random", seed=0),
    execution=ExecutionConfig(
        device="cpu", executor="in-process", torch_threads=1, progress="quiet"
    ),
    stats=StatsConfig(bootstrap=20, permutations=9),
)
Parts = dict[str, dict[tuple[str, str], np.ndarray]]  # key -> (region, layer) -> vector


COLUMNS = {
    "age": lambda i: str(40 + 7 * i),
    "sex": lambda i: "FM"[i % 2],
    "site": lambda i: "ST"[(i // 2) % 2],
    "scanner": lambda i: "AB"[i % 2],  # not the cohorts' pattern: ComBat can tell them apart
}


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three phantom subjects per cohort, and a subjects table with their ages."""
    folder = tmp_path_factory.mktemp("out-of-key")
    manifest = make_phantom_cohort(folder, n_per_cohort=3, shape=SHAPE, seed=5)
    subjects = read_manifest(manifest)
    table = ["subject_id,age"] + [f"{s.subject_id},{40 + 7 * i}" for i, s in enumerate(subjects)]
    (folder / "subjects.csv").write_text("\n".join(table) + "\n")
    return folder


def with_columns(cohort_dir: Path, adjust: AdjustConfig, target: Path) -> Path:
    """The manifest with the columns ``adjust`` names (a manifest may hold no others)."""
    names = [*adjust.covariates, *(c for c in (adjust.strata, adjust.harmonise) if c)]
    rows = [
        dataclasses.replace(s, covariates=tuple((n, COLUMNS[n](i)) for n in names))
        for i, s in enumerate(read_manifest(cohort_dir / "manifest.csv"))
    ]
    return write_manifest(rows, target)


def run_parts(manifest: Path, out: Path, cfg: RunConfig) -> Parts:
    result = driver.run(manifest, out, cfg, download=False)
    assert result.failed == 0 and result.done == 6, result
    parts = store.Parts(out)
    found: Parts = {}
    for key in parts.keys():  # noqa: SIM118 (Parts is not a mapping)
        table = pq.read_table(parts.path(key)).to_pandas()
        found[key] = {
            (str(r.region), str(r.layer)): np.asarray(r.vector, dtype=np.float32)
            for r in table.itertuples()
        }
    return found


@pytest.fixture(scope="module")
def defaults(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Parts:
    return run_parts(cohort_dir / "manifest.csv", tmp_path_factory.mktemp("base") / "out", BASE)


def same_bits(a: Parts, b: Parts) -> bool:
    return all(
        a[key].keys() == b[key].keys()
        and all(a[key][k].tobytes() == b[key][k].tobytes() for k in a[key])
        for key in a
    )


def flat(parts: Parts) -> dict[tuple[str, str, str], bytes]:
    """The vectors by subject id (a key's readable prefix), region and layer."""
    return {
        (key.split("--")[0], region, layer): vector.tobytes()
        for key, vectors in parts.items()
        for (region, layer), vector in vectors.items()
    }


def _weights_file(folder: Path) -> str:
    """The seed-0 random weights saved as a file: the same tensors, another source."""
    path = folder / "weights.pt"
    torch.save(random_weights("densenet121", 0).state_dict, path)
    return str(path)


def _checked_file(ray: str, folder: Path) -> RunConfig:
    """The weights file with its sha256 given (``--weights-sha256``)."""
    path = _weights_file(folder)
    model = ModelConfig(weights=path, weights_sha256=sha256_file(Path(path)))
    return dataclasses.replace(BASE, model=model)


# Each out-of-key field: how a run with another valid value is configured, from the
# session's GCS address (``ray``) and a scratch folder; the columns manifest is used
# where the field names a column.
Change = Callable[[str, Path], RunConfig]
# The fields that only a Ray run uses are changed together, in one Ray run (each Ray
# run takes 20 s here, minutes on a loaded machine); the in-process defaults' vectors
# are the reference, so the executor itself is changed there too.
ON_RAY = dataclasses.replace(
    BASE,
    execution=dataclasses.replace(
        BASE.execution,
        executor="ray",
        num_actors=2,
        actor_cpus=0.4,
        loader_cpus=0.3,
        actor_memory_gb=1.5,  # 0.5 GB for a subject beside the worker process's 1 GB
    ),
)
RAY_FIELDS = (
    "execution.executor",
    "execution.address",
    "execution.num_actors",
    "execution.actor_cpus",
    "execution.loader_cpus",
    "execution.actor_memory_gb",
)
ADJUSTED = dataclasses.replace(BASE, adjust=AdjustConfig(covariates=("age",)))


def _set(path: str, value: Any, base: RunConfig = BASE) -> Change:
    return lambda ray, folder: changed(path, value, base)


CHANGES: dict[str, Change] = {
    "preprocess.affine_tolerance_mm": _set("preprocess.affine_tolerance_mm", 0.5),
    "preprocess.max_voxels": _set("preprocess.max_voxels", SHAPE[0] * SHAPE[1] * SHAPE[2]),
    "regions.labels": _set("regions.labels", (("tibia", 2), ("femur", 1))),
    "model.weights": lambda ray, folder: changed("model.weights", _weights_file(folder), BASE),
    "model.seed": _set("model.seed", 1),
    "model.weights_sha256": _checked_file,
    "pooling.min_coverage": _set("pooling.min_coverage", 0.0),
    "execution.device": _set("execution.device", "auto"),  # no GPU in this process
    "execution.torch_threads": _set("execution.torch_threads", 2),
    "execution.progress": _set("execution.progress", "verbose"),
    "execution.stall_timeout_s": _set("execution.stall_timeout_s", 300.0),
    "ray": lambda ray, folder: changed("execution.address", ray, ON_RAY),  # RAY_FIELDS
    "execution.max_retries": _set("execution.max_retries", 0),
    "stats.bootstrap": _set("stats.bootstrap", 30),
    "stats.permutations": _set("stats.permutations", 19),
    "stats.seed": _set("stats.seed", 4),
    "stats.alpha": _set("stats.alpha", 0.01),
    "stats.min_n": _set("stats.min_n", 5),
    "stats.centre": _set("stats.centre", True),
    "stats.ci_level": _set("stats.ci_level", 0.9),
    "adjust.covariates": _set("adjust.covariates", ("age", "sex")),
    "adjust.strata": _set("adjust.strata", "site", ADJUSTED),
    "adjust.harmonise": _set("adjust.harmonise", "scanner"),
    "adjust.harmonise_with": _set("adjust.harmonise_with", "set in the test"),
    "adjust.drop_incomplete": _set("adjust.drop_incomplete", True, ADJUSTED),
    "adjust.subjects_table": _set("adjust.subjects_table", "set in the test", ADJUSTED),
}
# fields whose other value moves the key on purpose: the run recomputes, never reuses
KEY_MOVES = {
    "model.weights": "a weights file's sha256 is of the file, a random init's of its tensors",
    "model.weights_sha256": "it needs a weights file (see model.weights)",
    "model.seed": "other random weights: another sha256, other vectors",
    "execution.torch_threads": "the run's torch threads are in its execution identity",
    "regions.labels": "a subject without its own map is keyed with the run's (its row's labels)",
}
VECTORS_MOVE = {"model.seed", "regions.labels"}


def test_every_out_of_key_field_has_a_run_here() -> None:
    assert (set(CHANGES) - {"ray"}) | set(RAY_FIELDS) == set(OUT_OF_KEY)
    for path in RAY_FIELDS:
        assert config_value(ON_RAY, path) != config_value(BASE, path) or path.endswith("address")
    assert set(KEY_MOVES) <= set(CHANGES) and set(KEY_MOVES) >= VECTORS_MOVE


@pytest.mark.parametrize("path", sorted(CHANGES))
def test_an_out_of_key_option_leaves_the_vectors_bit_for_bit(
    path: str,
    cohort_dir: Path,
    defaults: Parts,
    ray_session: str,
    tmp_path: Path,
) -> None:
    cfg = CHANGES[path](ray_session, tmp_path)
    manifest = cohort_dir / "manifest.csv"
    if path == "adjust.subjects_table":
        cfg = changed(path, str(cohort_dir / "subjects.csv"), cfg)
    elif path == "adjust.harmonise_with":  # a finished harmonised run's fitted ComBat
        fitted, harmonised = tmp_path / "fitted", changed("adjust.harmonise", "scanner", BASE)
        run_parts(
            with_columns(cohort_dir, harmonised.adjust, tmp_path / "h.csv"), fitted, harmonised
        )
        cfg = changed(path, str(fitted), cfg)
        manifest = with_columns(cohort_dir, harmonised.adjust, tmp_path / "columns.csv")
    elif path.startswith("adjust."):
        manifest = with_columns(cohort_dir, cfg.adjust, tmp_path / "columns.csv")
    assert cfg != BASE
    found = run_parts(manifest, tmp_path / "out", cfg)

    if path in KEY_MOVES:
        assert not set(found) & set(defaults), KEY_MOVES[path]
        if path in VECTORS_MOVE:
            assert flat(found) != flat(defaults)
        elif path != "execution.torch_threads":  # threads may move the last digits
            assert flat(found) == flat(defaults), path
        return
    assert set(found) == set(defaults), path
    assert same_bits(found, defaults), f"{path} changed the vectors: it belongs in the key"
