"""The command line: validate, demo, option errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from click.testing import CliRunner, Result

from cohort.cli.main import main
from cohort.inputs.manifest import read_manifest
from cohort.synthetic import make_phantom_cohort


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


@pytest.fixture(scope="module")
def shallow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantoms of 24 slices (36 mm): DenseNet121's conv-1 needs 29 along D."""
    folder = tmp_path_factory.mktemp("shallow")
    return make_phantom_cohort(folder, n_per_cohort=1, shape=(24, 64, 64), seed=1)


def _problems(result: Result) -> dict[str, str]:
    lines = [line.split("\t") for line in result.output.splitlines()[1:]]
    return {sid: f"{stage}\t{message}" for sid, stage, message in lines if stage != "inputs"}


@pytest.mark.timeout(300)
def test_validate_checks_the_size_as_run_does_with_the_backbone_spacing_and_layers(
    shallow: Path, tmp_path: Path
) -> None:
    """The network's reach is built from the architecture (no weights read): the run
    refuses the same subjects with the same message; the backbone, --spacing and
    --layers given to validate change its answer as they change the run's."""
    found = _problems(CliRunner().invoke(main, ["validate", str(shallow)]))
    assert len(found) == 2 and all("too small for hooked layers" in m for m in found.values())
    assert all("29 voxels along D" in m for m in found.values()), found

    out = tmp_path / "out"
    ran = CliRunner().invoke(
        main, ["run", str(shallow), "--out", str(out), "--weights", "random", "--no-report"]
    )
    assert ran.exit_code == 1, ran.output
    errors = pd.read_csv(out / "errors.csv", keep_default_na=False)
    assert {r.subject_id: f"{r.stage}\t{r.message}" for r in errors.itertuples()} == found

    for accepted in (
        ["--backbone", "medicalnet-resnet10"],  # dilated, not strided, deep layers
        ["--spacing", "1.2,0.8,0.8"],  # 30 slices after resampling
        ["--layers", "features.denseblock3"],  # the shallower stage the message names
    ):
        result = CliRunner().invoke(main, ["validate", str(shallow), *accepted])
        assert result.exit_code == 0, (accepted, result.output)
        assert "2 subjects, 0 with problems" in result.output


def test_validate_takes_max_voxels_that_its_refusal_names(shallow: Path) -> None:
    shallower = ("--layers", "features.denseblock3")
    result = CliRunner().invoke(
        main, ["validate", str(shallow), "--max-voxels", "1000", *shallower]
    )
    assert result.exit_code == 1, result.output
    found = _problems(result)
    assert len(found) == 2 and all("--max-voxels" in m for m in found.values()), found
    assert "2 subjects, 0 with problems" in (
        CliRunner()
        .invoke(main, ["validate", str(shallow), "--max-voxels", "98304", *shallower])
        .output
    )


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


PLANTED = {("conv-5", "tibia-background"), ("conv-5", "femur-background")}


@pytest.mark.timeout(900)
def test_demo_runs_offline_and_finds_the_planted_difference(tmp_path: Path) -> None:
    """``make demo`` (``cohort demo --out demo-results``, in a process of its own, no Ray
    to join, no ImageNet weights cached) finds what the phantoms plant: the osteo
    cohort's bones lie closer to the background than the control's at the deepest
    hooked layer, conv-5, for both tibia-background and femur-background (q < 0.05),
    and nothing else between the cohorts reaches q < 0.05."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    env.update(RAY_AUTH_MODE="token", TORCH_HOME=str(tmp_path / "empty-cache"))
    command = [sys.executable, "-m", "cohort", "demo", "--out", "demo-results"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "seeded random" in output
    assert "20 done, 0 reused, 0 failed of 20 subjects" in output
    assert "in this process, without Ray" in output  # as make demo runs it
    results = tmp_path / "demo-results" / "results"
    assert (results / "report" / "report.html").is_file()
    run = json.loads((results / "run.json").read_text())
    assert run["weights"]["source"] == "random" and run["executor"] == "in-process"

    tests = pd.read_csv(results / "stats.csv")
    between = tests[tests.family.str.startswith("between") & (tests.status == "ok")]
    found = between[between.q_value < 0.05]
    assert set(zip(found.layer, found.pair, strict=True)) == PLANTED, between.to_string()
    assert set(found.test) == {"mannwhitneyu"} and set(found.cohort) == {"control|osteo"}
    similarity = pd.read_parquet(results / "similarity.parquet")
    for row in found.itertuples():
        a, b = str(row.pair).split("-")
        pair = (similarity.region_a == a) & (similarity.region_b == b)
        cosines = similarity[pair & (similarity.layer == row.layer)]
        control = cosines[cosines.cohort == "control"].cosine.to_numpy()
        osteo = cosines[cosines.cohort == "osteo"].cosine.to_numpy()
        assert (len(control), len(osteo)) == (10, 10)
        assert np.median(osteo) > np.median(control)  # the planted direction
        # rank-biserial of "control|osteo" from scipy's U of the first cohort (Kerby 2014):
        # 2 U / (n1 n2) - 1, negative when osteo's cosines are the higher
        u = scipy.stats.mannwhitneyu(control, osteo).statistic
        assert row.effect_name == "rank-biserial"
        assert row.effect_size == pytest.approx(2 * u / 100 - 1, abs=1e-12)
        assert row.effect_size < -0.8
        line = f"{row.layer} {row.pair}: mannwhitneyu q = {row.q_value:.2g}, rank-biserial"
        assert line in output
    assert "report.html#distributions (figure cosines_conv-5" in output
