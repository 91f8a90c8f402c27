"""Memory-aware subjects (issue 16): the estimate against the measured peak, and the check.

The estimate (:mod:`cohort.model.memory`) must come within 30 % of the peak the
torch profiler measures for the feature actor's call (``bench.memory_estimate``,
the allocation events of :mod:`bench.memory`), and a subject whose estimate
exceeds ``--actor-memory`` must fail at the ``check`` stage with the numbers,
while the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bench.memory import peak_bytes
from bench.memory_estimate import extractor, measured_forward
from cohort.cli.main import main
from cohort.config import (
    BACKBONES,
    DEFAULT_LAYERS,
    ExecutionConfig,
    PoolingMode,
    PreprocessConfig,
    RunConfig,
    format_label_map,
)
from cohort.errors import GeometryError
from cohort.execution import load as loading
from cohort.execution.extract import Features
from cohort.inputs.manifest import Subject, read_manifest, write_manifest
from cohort.inputs.preprocess import Deferred, Placed
from cohort.model import lean, memory, preparation
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.memory import (
    GIB,
    WORKER_BASE_BYTES,
    check_memory,
    estimate_peak_bytes,
    stage_of,
)
from cohort.model.network import build_network, random_weights
from cohort.synthetic import make_phantom_cohort

TOLERANCE = 0.30
SMALL = [(64, 64, 64), (48, 96, 80), (96, 128, 128)]  # (D, H, W)


def _within(estimate: int, measured: int) -> None:
    assert measured > 0
    ratio = estimate / measured
    assert abs(ratio - 1) <= TOLERANCE, f"estimate {estimate:,} vs measured {measured:,}"


@pytest.fixture(scope="module")
def densenet() -> FeatureExtractor:
    return extractor("densenet121")


# ------------------------------------------------------------- the estimate


def test_constants_are_the_lean_pass_own() -> None:
    assert memory.CHUNK_VOXELS == lean.DEFAULT_CHUNK_VOXELS
    assert memory.MIN_PIECE_VOXELS == lean.MIN_PIECE_VOXELS
    assert set(memory.PROFILES) == set(BACKBONES)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backbone", ["densenet121", "resnet18", "medicalnet-resnet10", "ct-fm"])
def test_profile_matches_the_built_network(backbone: str) -> None:
    network, _ = build_network(backbone, random_weights(backbone, 0).state_dict)
    profile = memory.PROFILES[backbone]
    built = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    assert profile.weights == built
    # conv-1/3/5 lie in the stages the calibration says, and the stages are the network's
    layers = resolve_layers(network, DEFAULT_LAYERS)
    assert tuple(stage_of(info.module_path) for info in layers) == profile.default
    names = {stage_of(path) for path, _ in network.named_modules() if path not in ("", "features")}
    assert {stage.name for stage in profile.stages} <= names


@pytest.mark.timeout(180)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
def test_densenet_estimate_within_30_percent_of_the_measured_peak(
    densenet: FeatureExtractor, shape: tuple[int, int, int]
) -> None:
    measured, _ = measured_forward(densenet, shape)
    est = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS)
    _within(est.forward, measured)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("shape", "chunk"), [((128, 128, 128), 1 << 19), ((192, 128, 128), 1 << 20)]
)
def test_densenet_estimate_holds_when_the_volume_is_several_depth_chunks(
    shape: tuple[int, int, int], chunk: int
) -> None:
    # full-size CTs are several chunks of 2^23 voxels; smaller chunks reach that regime
    # (chunks, halos, the full-volume dense block) on small volumes
    ex = extractor("densenet121", chunk_voxels=chunk)
    measured, _ = measured_forward(ex, shape)
    est = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS, chunk_voxels=chunk)
    whole = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS)  # one chunk: 66 B/voxel
    assert est.forward < 0.6 * whole.forward  # the chunked regime is what is tested
    _within(est.forward, measured)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pooling", ["masked-pool", "masked-input"])
def test_plain_backbone_estimate_within_30_percent(pooling: PoolingMode) -> None:
    shape = (96, 128, 128)
    ex = extractor("medicalnet-resnet10")
    measured, _ = measured_forward(ex, shape, pooling)
    layers = [info.module_path for info in ex.layers]
    est = estimate_peak_bytes(shape, "medicalnet-resnet10", layers, pooling)
    _within(est.forward, measured)


@pytest.fixture(scope="module")
def features() -> Features:
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    return Features(network, RunConfig(execution=ExecutionConfig(device="cpu")), 1, "test")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("window", "shape", "dtype", "normalise", "flips", "pieces"),
    [
        (None, (24, 40, 48), np.int16, "fixed", (), 4096),
        (None, (24, 40, 48), np.float32, "foreground", (), 4096),  # eleven statistics slabs
        (None, (8, 10, 12), np.int16, "foreground", (), 4096),  # smaller than the slab
        ((48, 80, 96), (24, 40, 48), np.int16, "fixed", (0,), 4096),
        ((48, 80, 96), (24, 40, 48), np.int16, "fixed", (0,), 1 << 21),  # each pass whole
        ((12, 80, 30), (24, 40, 48), np.float32, "foreground", (), 4096),  # up and down
        ((40, 40, 40), (20, 40, 80), np.int16, "fixed", (1, 2), 4096),
        ((40, 40, 40), (20, 40, 80), np.int16, "fixed", (1, 2), 100),  # a slice per piece
    ],
    ids=[
        "fixed",
        "foreground",
        "one-slab",
        "halved-flipped",
        "halved-whole-passes",
        "float-mixed",
        "int-mixed",
        "int-slices",
    ],
)
def test_the_preparation_estimate_is_the_profiled_peak_of_the_actor_making_its_input(
    features: Features,
    monkeypatch: pytest.MonkeyPatch,
    window: tuple[int, int, int] | None,
    shape: tuple[int, int, int],
    dtype: type,
    normalise: str,
    flips: tuple[int, ...],
    pieces: int,
) -> None:
    """Features._inputs (resampling, window, normalisation) on the CPU, its tensor memory
    from the torch profiler's allocation events, against Estimate.prepare."""
    slab = 4096  # the foreground's slab (the actor's and the estimate's), small here
    monkeypatch.setattr(preparation, "STATS_VOXELS", slab)
    monkeypatch.setattr(preparation, "RESAMPLE_VOXELS", pieces)  # the resampling's pieces too
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, window or shape).astype(dtype)
    deferred = None
    if window is not None:
        ratio = (window[0] / shape[0], window[1] / shape[1], window[2] / shape[2])
        deferred = Deferred(ratio, (0, 0, 0), shape, (0, 0, 0), window, flips)
    placed = Placed(
        hu=hu,
        region_index=np.zeros(shape, dtype=np.uint8),
        region_names=("background",),
        voxels=(math.prod(shape),),
        spacing_mm=(1.0, 1.0, 1.0),
        original_orientation="RAS",
        deferred=deferred,
    )
    features.cfg = RunConfig(
        execution=ExecutionConfig(device="cpu"),
        preprocess=PreprocessConfig(normalise=normalise, foreground_hu=-500.0),  # type: ignore[arg-type]
    )
    measured = peak_bytes(lambda: features._inputs(placed, "ct.nii.gz"))
    est = estimate_peak_bytes(
        shape,
        "densenet121",
        DEFAULT_LAYERS,
        window=window,
        hu_bytes=np.dtype(dtype).itemsize,
        foreground=normalise == "foreground",
    )
    assert measured > 0
    assert abs(est.prepare / measured - 1) <= 0.02, f"{est.prepare:,} vs {measured:,}"


def test_estimate_follows_precision_device_planes_and_layers() -> None:
    shape = (216, 512, 512)
    voxels = math.prod(shape)
    cpu = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS)
    # the hand-over (int16 HU, one uint8 plane), the weights, the float32 input and the maps
    assert cpu.inputs == 3 * voxels and cpu.image == 4 * voxels
    assert cpu.gpu == 0 and cpu.host == cpu.inputs + cpu.weights + cpu.image + cpu.forward
    gpu = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS, device="cuda")
    assert gpu.host == 2 * gpu.inputs  # the row and its pinned copy
    assert gpu.gpu == gpu.inputs + gpu.weights + gpu.image + gpu.forward
    bf16 = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS, "masked-pool", "bf16", "cuda")
    assert bf16.forward < 0.7 * gpu.forward
    two = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS, planes=2, hu_bytes=4)
    assert two.inputs == 6 * voxels
    # --spacing: the stored window is handed over, and resampled in the actor
    stored = (216, 1024, 1024)
    fine = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS, window=stored)
    assert fine.inputs == 2 * math.prod(stored) + voxels
    assert fine.prepare > fine.image + fine.forward and fine.phase == "resampling"
    assert fine.host == fine.inputs + fine.weights + fine.prepare
    # a hook in dense block 1 keeps its 256-channel map at 1/4 resolution: 16 B/voxel
    shallow = estimate_peak_bytes(shape, "densenet121", ["features.denseblock1"])
    assert shallow.forward > cpu.forward + 15 * math.prod(shape)
    # bytes per voxel fall with depth (the lean pass streams its first stages)
    deep = estimate_peak_bytes((1000, 512, 512), "densenet121", DEFAULT_LAYERS)
    assert deep.forward / 1000 < cpu.forward / 216


# ------------------------------------------------------------- the check


def _cfg(actor_memory_gb: float, **preprocess: object) -> RunConfig:
    return RunConfig(
        execution=ExecutionConfig(device="cpu", actor_memory_gb=actor_memory_gb),
        preprocess=PreprocessConfig(**preprocess),  # type: ignore[arg-type]
    )


def _gb_in(message: str, label: str) -> float:
    found = re.search(label, message)
    assert found, message
    return float(found.group(1))


def test_a_subject_over_the_actor_memory_fails_with_the_numbers_and_the_fixes() -> None:
    shape = (216, 512, 512)
    est = estimate_peak_bytes(shape, "densenet121", DEFAULT_LAYERS)
    need = (est.host + WORKER_BASE_BYTES) / GIB
    cfg = _cfg(1.5)
    with pytest.raises(GeometryError) as caught:
        check_memory(shape, (1.0, 0.7, 0.7), cfg, DEFAULT_LAYERS, "cpu", "ct.nii.gz")
    message = str(caught.value)
    assert "image ct.nii.gz gives a model input of 216x512x512 voxels" in message
    assert _gb_in(message, r"needs an estimated ([\d.]+) GB") == pytest.approx(need, abs=0.01)
    assert "more than the 1.5 GB each actor has (--actor-memory)" in message
    assert f"{WORKER_BASE_BYTES / GIB:.2f} GB for the worker process" in message
    for fix in ("--actor-memory", "--spacing", "--crop-margin", "--device cuda"):
        assert fix in message
    # each number the message suggests is one that fits
    suggested = _gb_in(message, r"--actor-memory ([\d.]+) \(or more\)")
    check_memory(shape, (1.0, 0.7, 0.7), _cfg(suggested), DEFAULT_LAYERS, "cpu", "ct.nii.gz")
    found = re.search(r"--spacing ([\d.,]+)\)", message)
    assert found, message
    spacing = [float(v) for v in found.group(1).split(",")]
    d, h, w = (
        max(1, math.floor(n * s / t + 0.5))
        for n, s, t in zip(shape, (1.0, 0.7, 0.7), spacing, strict=True)
    )
    # resampled in the actor from the stored grid, which the loader then hands over
    check_memory((d, h, w), spacing, cfg, DEFAULT_LAYERS, "cpu", "ct.nii.gz", window=shape)
    # and the subject fits the default actor
    check_memory(shape, (1.0, 0.7, 0.7), RunConfig(), DEFAULT_LAYERS, "cpu", "ct.nii.gz")


def test_on_a_gpu_the_actor_keeps_the_inputs_and_the_gpu_part_is_checked_where_known() -> None:
    shape = (648, 512, 512)
    layers = DEFAULT_LAYERS
    est = check_memory(shape, (1.0, 1.0, 1.0), _cfg(3.0), layers, "cuda", "ct.nii.gz")
    assert est.host == 2 * est.inputs
    with pytest.raises(GeometryError, match=r"GPU memory.*a GPU with more memory"):
        check_memory(shape, (1, 1, 1), _cfg(3.0), layers, "cuda", "ct", gpu_bytes=est.gpu - 1)
    cropped = _cfg(1.0, crop_margin_mm=30.0)
    with pytest.raises(GeometryError, match="a smaller --crop-margin than 30 mm"):
        check_memory(shape, (1, 1, 1), cropped, layers, "cuda", "ct")


def _phantoms(folder: Path, shapes: dict[str, tuple[int, int, int]]) -> Path:
    subjects: list[Subject] = []
    for name, shape in shapes.items():
        manifest = make_phantom_cohort(
            folder / name, n_per_cohort=1 if name == "large" else 2, cohorts=(name,), shape=shape
        )
        subjects.extend(read_manifest(manifest))
    rows = [dataclasses.replace(s, row=i + 1) for i, s in enumerate(subjects)]
    return write_manifest(rows, folder / "manifest.csv")


def _limit_between(small: tuple[int, int, int], large: tuple[int, int, int]) -> float:
    """An --actor-memory (GB) that the small subjects fit and the large one does not."""
    need = [
        (estimate_peak_bytes(s, "densenet121", DEFAULT_LAYERS).host + WORKER_BASE_BYTES) / GIB
        for s in (small, large)
    ]
    assert need[1] - need[0] > 0.05
    return round((need[0] + need[1]) / 2, 3)


@pytest.mark.timeout(120)
def test_the_loader_fails_the_subject_at_the_check_stage(tmp_path: Path) -> None:
    small, large = (32, 64, 64), (96, 128, 128)
    manifest = _phantoms(tmp_path, {"small": small, "large": large})
    limit = _limit_between(small, large)
    cfg = _cfg(limit)
    outs = {}
    for subject in read_manifest(manifest):
        row = {
            "subject_id": subject.subject_id,
            "image": str(subject.image),
            "mask": str(subject.mask),
            "labels": format_label_map(cfg.regions.labels),
        }
        outs[subject.subject_id] = loading.load_subject(row, cfg, "identity", frozenset())
    refused = outs.pop("large-01")
    assert all(out["status"] == loading.READY for out in outs.values())
    assert (refused["status"], refused["stage"]) == (loading.FAILED, "check")
    assert refused["error_type"] == "GeometryError"
    assert "96x128x128 voxels" in refused["message"]
    assert f"the {limit:g} GB each actor has (--actor-memory)" in refused["message"]
    assert refused["hu"].size == 0 and refused["planes"].size == 0  # nothing handed over
    # on GPU workers (the driver passes the actor pool's device) the maps are not in the
    # actor's own memory, and the same subject fits
    row = {**{k: refused[k] for k in ("subject_id", "image", "mask")}}
    row["labels"] = format_label_map(cfg.regions.labels)
    on_gpu = loading.load_subject(row, cfg, "identity", frozenset(), device="cuda")
    assert on_gpu["status"] == loading.READY, on_gpu["message"]


@pytest.mark.timeout(300)
def test_run_fails_only_the_subject_over_the_actor_memory(
    ray_session: None, tmp_path: Path
) -> None:
    small, large = (32, 64, 64), (96, 128, 128)
    manifest = _phantoms(tmp_path / "in", {"small": small, "large": large})
    limit = _limit_between(small, large)
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--quiet", "--device", "cpu"]
    args += ["--actors", "1", "--weights", "random", "--stall-timeout", "240"]
    args += ["--bootstrap", "50", "--permutations", "9", "--no-report"]
    result = CliRunner().invoke(main, [*args, "--actor-memory", str(limit)])
    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv")
    assert errors["subject_id"].tolist() == ["large-01"]
    assert errors["stage"].tolist() == ["check"]
    message = errors["message"].iloc[0]
    assert "96x128x128 voxels" in message and "needs an estimated" in message
    assert "--actor-memory" in message
    features = pd.read_parquet(out / "features.parquet")
    assert sorted(set(features["subject_id"])) == ["small-01", "small-02"]
