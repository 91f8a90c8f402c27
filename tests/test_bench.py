"""Smoke tests of the bench harness on tiny volumes (the bench itself is ``make bench``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import core
from bench.baseline import run_baseline
from bench.run import main, phantom_cohort
from cohort.config import PoolingConfig, PreprocessConfig
from cohort.execution.driver import cosine_rows
from cohort.inputs.preprocess import air_value
from cohort.model.network import random_weights
from cohort.model.pooling import extract

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TINY = (32, 48, 48)


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_cohort(tmp_path_factory.mktemp("bench"), 2, TINY)


def test_baseline_cosines_match_cohort_masked_input(tiny_manifest: Path) -> None:
    """The independent plain loop and cohort's core agree on the origin protocol."""
    loaded, _ = core.load_all(tiny_manifest, PreprocessConfig())
    triples = [
        (s.subject_id, tiny_manifest.parent / "images", tiny_manifest.parent / "masks")
        for s in loaded
    ]
    triples = [(sid, i / f"{sid}.nii.gz", m / f"{sid}.nii.gz") for sid, i, m in triples]
    base = run_baseline(triples, weights="random", seed=0)
    ex = core.extractor(random_weights("densenet121", 0).state_dict)
    cfg, air = PoolingConfig(mode="masked-input"), air_value(PreprocessConfig())
    compared = 0
    for s in loaded:
        rows = cosine_rows(extract(ex, s.image, s.index, s.names, cfg, air))
        assert len(rows) == len(base.cosines[s.subject_id]) == 9
        for row in rows:
            expected = base.cosines[s.subject_id][(row["layer"], row["region_a"], row["region_b"])]
            assert abs(row["cosine"] - expected) <= 1e-4, (s.subject_id, row, expected)
            compared += 1
    assert compared == 18
    # the check can fail: another seed gives other cosines
    other = run_baseline(triples[:1], weights="random", seed=1).cosines[triples[0][0]]
    ours = base.cosines[triples[0][0]]
    assert max(abs(other[k] - ours[k]) for k in ours) > 1e-3


def test_batched_regions_equal_one_forward_per_region(tiny_manifest: Path) -> None:
    loaded, _ = core.load_all(tiny_manifest, PreprocessConfig(), limit=1)
    ex = core.extractor(random_weights("densenet121", 0).state_dict)
    _, single = core.run_variant("masked-input", ex, loaded)
    _, batched = core.run_variant("masked-input/regions", ex, loaded)
    assert core.max_difference(single, batched) <= 1e-5
    assert [v.region for v in single[0]] == [v.region for v in batched[0]]


def test_bench_writes_table_and_json(tmp_path: Path) -> None:
    torch_threads = torch.get_num_threads()
    try:
        result = main(
            [
                "--subjects", "2", "--shape", "32,64,64", "--repeats", "1",
                "--variants", "masked-pool,masked-input,masked-input/regions",
                "--skip", "pipeline,memory", "--out", str(tmp_path),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(torch_threads)
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "baseline (plain loop)",
        "model masked-pool",
        "model masked-input",
        "model masked-input/regions",
    ]
    assert all(row["per_s"] > 0 for row in result["rows"])
    assert result["ceiling_gflops"]["best"] > 0
    assert {f["stem"] for f in result["forward"]} == {"1-channel", "3-channel"}
    gflop = {
        (f["stem"], f["stop_after_last_hook"], f["factorised"]): f["gflop"]
        for f in result["forward"]
    }
    # the gray stem saves the stem's FLOPs; the depth factorisation saves more
    assert 0 < gflop["1-channel", True, True] < gflop["1-channel", True, False]
    assert gflop["1-channel", True, False] < gflop["3-channel", True, False]
    assert np.isfinite(result["summary"]["model masked-pool / baseline"])
    saved = json.loads((tmp_path / "latest.json").read_text())
    assert saved["rows"] == result["rows"]  # NaN written as null
    assert saved["rows"][0]["driver_mib"] is None
    assert "baseline (plain loop)" in (tmp_path / "latest.txt").read_text()


def test_gpu_check_stops_at_once_without_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.timeout(300)
def test_gpu_check_dry_run_on_the_cpu_writes_its_table(tmp_path: Path) -> None:
    from bench import gpu_check

    code = gpu_check.main(
        ["--device", "cpu", "--shapes", "64,64,64", "--repeats", "1", "--no-pipeline",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    variants = {(r["factorised"], r["lean"]) for r in report["model"]}
    assert variants == {(True, True), (True, False), (False, True), (False, False)}
    assert all(r["best_s"] > 0 and r["shape"] == "64x64x64" for r in report["model"])
    assert report["pipeline"] == [{"skipped": "--no-pipeline"}]


@pytest.mark.parametrize("mode", ["masked-pool", "masked-input"])
def test_startup_floor_actor_does_the_whole_extraction(mode: str) -> None:
    """The floor's actor runs cohort's network and pooling (three regions at three
    layers); a floor that skipped the model would bound nothing."""
    from bench.startup_floor import Extract

    actor = Extract((64, 64, 64), mode)
    calls = []
    original = actor.extractor.forward
    actor.extractor.forward = lambda x: calls.append(x.shape) or original(x)  # type: ignore[method-assign]
    assert actor({"subject": [0]})["vectors"] == [9]
    assert len(calls) == (3 if mode == "masked-input" else 1)
