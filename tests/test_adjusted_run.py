"""``cohort run`` with covariates from the manifest: checked before any work, carried to
the reducer, recorded in run.json (issue 24)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from cohort.cli.main import main
from cohort.inputs.manifest import read_manifest, read_subjects_table, write_manifest
from cohort.outputs import schemas

pytestmark = pytest.mark.timeout(300)

FAST = ["--device", "cpu", "--weights", "random", "--bootstrap", "50", "--permutations", "19",
        "--no-report", "--quiet"]  # fmt: skip


def with_columns(manifest: Path, target: Path, ages: list[str]) -> Path:
    """The small cohort's manifest with an age and a site column."""
    subjects = read_manifest(manifest)
    rows = [
        dataclasses.replace(s, covariates=(("age", age), ("site", "AB"[i % 2])))
        for i, (s, age) in enumerate(zip(subjects, ages, strict=True))
    ]
    return write_manifest(rows, target)


def cohort_run(manifest: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), *FAST, *extra])


def test_manifest_keeps_the_named_columns_and_refuses_others(
    small_cohort: Path, tmp_path: Path
) -> None:
    manifest = with_columns(small_cohort, tmp_path / "m.csv", ["40", "51", "62", "45", "58", "70"])
    assert "age,site" in manifest.read_text().splitlines()[0]
    subjects = read_manifest(manifest, ("age", "site"))
    assert subjects[1].covariates == (("age", "51"), ("site", "B"))
    with pytest.raises(Exception, match=r"unknown column\(s\) 'site'.*--covariates"):
        read_manifest(manifest, ("age",))
    table = tmp_path / "t.csv"
    table.write_text("subject_id,age\na,1\na,2\n")
    with pytest.raises(Exception, match=r"'a' appears in row 1 and again in row 2"):
        read_subjects_table(table)


def test_a_run_with_covariates_records_them_and_adds_adjusted_rows(
    small_cohort: Path, tmp_path: Path
) -> None:
    manifest = with_columns(small_cohort, tmp_path / "m.csv", ["40", "51", "62", "45", "58", "70"])
    out = tmp_path / "out"
    result = cohort_run(manifest, out, "--covariates", "age", "--strata", "site")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["adjust"]["covariates"] == ["age"]
    assert record["covariates"]["covariates"] == [{"name": "age", "type": "continuous"}]
    assert record["covariates"]["strata"]["levels"] == ["A", "B"]
    tests = pd.read_parquet(out / "stats.parquet")
    adjusted = tests[tests.adjusted_for == "age"]
    assert set(adjusted.family) == {"between-pairs-adjusted", "between-features-adjusted"}
    assert (adjusted.loc[adjusted.status == "skipped", "reason"].str.len() > 0).all()
    features = pd.read_parquet(out / "features.parquet")
    assert list(features.columns) == list(schemas.FEATURES_COLUMNS)  # tables unchanged
    saved = pd.read_parquet(out / "covariates.parquet")
    assert saved.age.tolist() == ["40", "51", "62", "45", "58", "70"]


@pytest.mark.parametrize(
    ("ages", "options", "says"),
    [
        (
            ["40", "51", "62", "45", "58", "70"],
            ["--covariates", "age,weight"],
            "'weight' named by --covariates",
        ),
        (["40", "", "62", "45", "58", "70"], ["--covariates", "age"], "no value of 'age'"),
        (["40"] * 6, ["--covariates", "age"], "covariate 'age' has one value (40)"),
    ],
    ids=["unknown-column", "missing-value", "constant"],
)
def test_unusable_covariates_exit_2_before_any_work(
    small_cohort: Path, tmp_path: Path, ages: list[str], options: list[str], says: str
) -> None:
    manifest = with_columns(small_cohort, tmp_path / "m.csv", ages)
    out = tmp_path / "out"
    result = cohort_run(manifest, out, *options, "--strata", "site")
    assert result.exit_code == 2, result.output
    assert says in result.output
    if "missing" in says or "no value" in says:
        assert "control-02" in result.output and "--drop-incomplete" in result.output
    assert not (out / "features.parquet").exists()


def test_the_confounded_demo_cohort_ties_age_to_cohort_and_bone(tmp_path: Path) -> None:
    import nibabel as nib

    from cohort.synthetic import make_confounded_cohort

    manifest = make_confounded_cohort(tmp_path / "data", n_per_cohort=3, shape=(32, 48, 48))
    subjects = read_manifest(manifest, ("age",))
    ages = {s.subject_id: float(dict(s.covariates)["age"]) for s in subjects}
    assert ages == {"control-01": 30.0, "control-02": 42.5, "control-03": 55.0,
                    "osteo-01": 50.0, "osteo-02": 62.5, "osteo-03": 75.0}  # fmt: skip

    def bone_hu(subject_id: str) -> float:
        image = nib.load(tmp_path / "data" / "images" / f"{subject_id}.nii.gz").get_fdata()
        mask = nib.load(tmp_path / "data" / "masks" / f"{subject_id}.nii.gz").get_fdata()
        bone = image[mask == 1]
        return float(np.median(bone[bone < 900]))  # trabecular, not the cortical shell

    # older knees are less dense, whatever their cohort (the trabecular median falls with age)
    assert abs(bone_hu("osteo-01") - bone_hu("control-03")) < 40  # 50 and 55 years
    assert (
        bone_hu("control-01") > bone_hu("control-02") > bone_hu("control-03") > bone_hu("osteo-03")
    )


def test_confounding_findings_say_what_each_test_found(tmp_path: Path) -> None:
    from cohort.cli.demo import confounding_findings

    rows = pd.DataFrame(
        {
            "family": ["between-pairs"] * 3 + ["between-pairs-adjusted"] * 3,
            "status": ["ok"] * 6,
            "q_value": [0.01, 0.02, 0.4, 0.3, 0.5, 0.9],
        }
    )
    rows.to_parquet(tmp_path / "stats.parquet")
    text = confounding_findings(tmp_path, 0.05)
    assert "unadjusted (Mann-Whitney): 2 of 3 cosine tests" in text
    assert "adjusted for age (Freedman-Lane): 0 of 3 do" in text
    assert "adjusted for it, the cohorts do not differ" in text
