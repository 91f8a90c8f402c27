"""``cohort run`` with each 3D backbone on a small phantom cohort, through Ray."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import PRESETS, PreprocessConfig
from cohort.synthetic import make_phantom_cohort
from tests.direct import direct_masked_input

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(420)]

FAST = ["--weights", "random", "--device", "cpu", "--actors", "1", "--quiet", "--no-report"]
FAST += ["--stall-timeout", "240", "--bootstrap", "20", "--permutations", "9"]
REGIONS = {"tibia", "femur", "background"}
# backbone -> (preset, channels of conv-1, conv-3, conv-5, extra options)
CASES = {
    "medicalnet-resnet10": ("medicalnet", (512, 512, 256), ("--pooling", "masked-input")),
    "medicalnet-resnet18": ("medicalnet", (512, 512, 256), ()),
    "medicalnet-resnet34": ("medicalnet", (512, 512, 512), ()),
    "medicalnet-resnet50": ("medicalnet", (2048, 512, 512), ()),
    "ct-fm": ("ct-fm", (512, 512, 512), ()),
}


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cohorts of two 32 x 48 x 48 phantom knees (1.5 x 0.8 x 0.8 mm)."""
    folder = tmp_path_factory.mktemp("tiny-cohort")
    return make_phantom_cohort(folder, n_per_cohort=2, shape=(32, 48, 48), seed=5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cohort_run_with_each_3d_backbone(
    name: str, ray_session: None, tiny_cohort: Path, tmp_path: Path
) -> None:
    preset, channels, extra = CASES[name]
    out = tmp_path / "out"
    args = ["run", str(tiny_cohort), "--out", str(out), "--backbone", name, *FAST, *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    features = pq.read_table(out / "features.parquet").to_pandas()
    assert len(features) == 4 * 3 * 3  # subjects x regions x layers
    assert set(features.region) == REGIONS
    by_layer = dict(zip(features.layer, features.channels, strict=True))
    assert by_layer == dict(zip(("conv-1", "conv-3", "conv-5"), channels, strict=True))
    assert all(len(v) == c for v, c in zip(features.vector, features.channels, strict=True))
    assert np.isfinite(np.concatenate(features.vector.to_list())).all()

    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"subjects": 4, "done": 4, "cached": 0, "failed": 0}
    recorded = run["config"]["preprocess"]
    assert recorded["preset"] == preset
    expected = dataclasses.asdict(PreprocessConfig.for_backbone(name))
    for field in ("hu_min", "hu_max", "normalise", "mean", "std", "axes", "foreground_hu"):
        assert recorded[field] == expected[field], field
    spacing = PRESETS[preset].target_spacing
    assert recorded["target_spacing"] == (None if spacing is None else list(spacing))
    assert run["config"]["model"]["backbone"] == name
    assert run["weights"]["source"] == "random"
    assert run["weights"]["architecture"].startswith("MONAI ")
    assert [layer["channels"] for layer in run["layers"]] == list(channels)

    if "masked-input" in extra:  # the per-volume air of the foreground z-score reaches the actor
        _equals_direct_masked_input(name, tiny_cohort, features)


def _equals_direct_masked_input(name: str, manifest: Path, features: pd.DataFrame) -> None:
    subject_id, prepared, direct = direct_masked_input(
        name, manifest, PreprocessConfig.for_backbone(name)
    )
    assert prepared.air < -1.0  # air lies well below the foreground's mean
    mine = features[features.subject_id == subject_id]
    for vector in direct:
        row = mine[(mine.region == vector.region) & (mine.layer == vector.layer)]
        np.testing.assert_allclose(row.vector.item(), vector.vector, rtol=1e-5, atol=1e-6)
