"""The command line: validate, demo, option errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.inputs.manifest import read_manifest


def test_validate_clean_manifest_exits_0(small_cohort: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(small_cohort)])
    assert result.exit_code == 0, result.output
    assert "6 subjects, 0 with problems" in result.output


def test_validate_lists_each_problem(small_cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(small_cohort.parent, folder)
    subjects = read_manifest(folder / "manifest.csv")
    subjects[1].mask.unlink()
    # a mask without label 2 (femur)
    mask = nib.load(subjects[2].mask)
    data = np.asarray(mask.dataobj).copy()
    data[data == 2] = 0
    nib.save(nib.Nifti1Image(data, mask.affine, mask.header), subjects[2].mask)
    result = CliRunner().invoke(main, ["validate", str(folder / "manifest.csv")])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "6 subjects, 2 with problems"
    missing = next(line for line in lines if line.startswith(subjects[1].subject_id))
    assert "\tload\t" in missing
    assert str(subjects[1].mask.name) in missing
    absent = next(line for line in lines if line.startswith(subjects[2].subject_id))
    assert "\tcheck\t" in absent
    assert "femur" in absent


def test_validate_unusable_manifest_exits_2(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,image,mask\na,x.nii,y.nii\na,x.nii,y.nii\n")
    result = CliRunner().invoke(main, ["validate", str(manifest)])
    assert result.exit_code == 2
    assert "appears in row 1 and again in row 2" in result.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--labels", "tibia=1,tibia=2", "repeat"),
        ("--labels", "background=3", "reserved"),
        ("--hu-window", "2000,-1000", "low < high"),
        ("--spacing", "1,1", "3 numbers"),
        ("--actor-cpus", "0.5", "must differ"),
    ],
)
def test_bad_options_are_usage_errors(
    small_cohort: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = CliRunner().invoke(
        main, ["run", str(small_cohort), "--out", str(tmp_path), option, value]
    )
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_demo_runs_offline_and_finds_the_planted_difference(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's two cohorts differ (trabecular bone density and texture), and with random
    weights the default analysis finds it: a between-cohort test with q < 0.05, which the
    printout names with where to look."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--per-cohort", "6"])
    assert result.exit_code == 0, result.output
    assert "seeded random" in result.output
    assert "cohort control" in result.output
    assert "tibia-background" in result.output
    assert "on the running Ray at" in result.output  # the test session's instance, joined
    assert (out / "results" / "report" / "report.html").is_file()
    run = json.loads((out / "results" / "run.json").read_text())
    assert run["weights"]["source"] == "random"
    assert run["counts"]["done"] == 12
    tests = pd.read_csv(out / "results" / "stats.csv")
    between = tests[tests.family.str.startswith("between") & (tests.status == "ok")]
    found = between[between.q_value < 0.05]
    assert len(found), between.sort_values("q_value").head().to_string()
    best = found.sort_values(["q_value", "p_value"]).iloc[0]
    assert f"{best.layer} {best.pair}: {best.test} q = {best.q_value:.2g}" in result.output
    assert "report.html#distributions" in result.output
