"""cohort robustness end to end: units, error rows, resume, the tables, --robust-only,
and a known answer (an interior cosine is robust, a boundary cosine is not)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import ndimage
from scipy.stats import false_discovery_control

from cohort.cli.main import main
from cohort.execution.robust_tables import icc_rows
from cohort.inputs.chain import perturb_pair
from cohort.inputs.chain_config import PerturbationConfig
from cohort.inputs.readers import VolumePair
from cohort.inputs.segmentation import LabelRegions
from cohort.inputs.volume import Volume
from cohort.outputs import schemas
from cohort.synthetic import make_phantom_subject, write_phantom_nifti

K = 2
OPTIONS = ["--weights", "random", "--device", "cpu", "--quiet", "--no-report"]
OPTIONS += ["--bootstrap", "50", "--permutations", "19", "--min-coverage", "0"]
OPTIONS += ["--perturbations", str(K), "--volume-change", "-0.3,-0.1"]


@pytest.fixture(scope="module")
def cohort_with_a_tiny_region(tmp_path_factory: pytest.TempPathFactory, small_cohort: Path) -> Path:
    """The small cohort plus subject ``tiny``, whose tibia is one voxel (every
    perturbation shrinks it to nothing)."""
    folder = tmp_path_factory.mktemp("robust-cohort")
    hu, label = make_phantom_subject((64, 64, 64), seed=5)
    label[label == 1] = 0
    label[20, 32, 32] = 1
    image, mask = folder / "tiny_ct.nii.gz", folder / "tiny_seg.nii.gz"
    write_phantom_nifti(hu, label, (1.5, 0.8, 0.8), image, mask)
    manifest = folder / "manifest.csv"
    with small_cohort.open() as source, manifest.open("w", newline="") as target:
        rows = list(csv.DictReader(source))
        writer = csv.DictWriter(target, fieldnames=["subject_id", "image", "mask", "cohort"])
        writer.writeheader()
        for row in rows:
            for name in ("image", "mask"):
                row[name] = str((small_cohort.parent / row[name]).resolve())
            writer.writerow({k: row[k] for k in ("subject_id", "image", "mask", "cohort")})
        writer.writerow({"subject_id": "tiny", "image": image, "mask": mask, "cohort": "control"})
    return manifest


@pytest.fixture(scope="module")
def robust_run(cohort_with_a_tiny_region: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("robust-run") / "out"
    args = ["robustness", str(cohort_with_a_tiny_region), "--out", str(out), *OPTIONS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output  # tiny's perturbations failed
    assert "ICC(1,1) of each cosine over 6 subjects x 2 perturbations" in result.output
    assert "21 units (7 subjects x 3" in result.output
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failing_perturbation_is_an_error_row_and_the_run_goes_on(robust_run: Path) -> None:
    errors = pd.read_csv(robust_run / "robustness_errors.csv")
    assert errors["subject_id"].tolist() == ["tiny"] * K
    assert sorted(errors["perturbation"]) == list(range(1, K + 1))
    assert set(errors["stage"]) == {"perturb"} and set(errors["error_type"]) == {"RegionError"}
    assert errors["message"].str.contains("'tibia' of subject tiny has no voxels").all()
    # the original of tiny is done: it is in the usual outputs, which hold originals only
    features = pd.read_parquet(robust_run / "features.parquet")
    assert "tiny" in set(features["subject_id"])
    assert not features["subject_id"].str.contains("perturbation").any()
    assert pd.read_csv(robust_run / "errors.csv").empty
    run = json.loads((robust_run / "run.json").read_text())
    assert run["counts"]["subjects"] == 7 and run["counts"]["failed"] == 0
    assert run["robustness"]["counts"] == {"units": 21, "done": 19, "cached": 0, "failed": 2}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_tables_say_who_entered_and_what_was_drawn(robust_run: Path) -> None:
    table = pd.read_parquet(robust_run / "robustness.parquet")
    assert list(table.columns) == list(schemas.ROBUSTNESS_SCHEMA.names)
    assert len(table) == 9  # 3 layers x 3 region pairs
    assert set(table["n_subjects"]) == {6} and set(table["n_excluded"]) == {1}
    assert set(table["n_perturbations"]) == {K} and set(table["icc_form"]) == {"ICC(1,1)"}
    ok = table["status"] == "ok"
    assert ok.all(), table[~ok]
    assert ((table["icc_low"] <= table["icc"]) & (table["icc"] <= table["icc_high"])).all()
    assert (table["robust"] == (table["icc_low"] >= 0.9)).all()
    similarity = pd.read_parquet(robust_run / "robustness_similarity.parquet")
    assert list(similarity.columns) == list(schemas.ROBUSTNESS_SIMILARITY_SCHEMA.names)
    assert len(similarity) == 19 * 9  # every done unit's 9 cosines
    perturbed = similarity[similarity["perturbation"] > 0]
    assert (perturbed["noise_sd_hu"] > 0).all() and (perturbed["contour_band_mm"] == 1.5).all()
    assert perturbed["volume_change"].between(-0.3, -0.1).all()
    assert perturbed["chain"].eq("noise+translate+volume+contour").all()
    original = similarity[similarity["perturbation"] == 0]
    assert (original["noise_sd_hu"] == 0).all() and original["chain"].eq("").all()
    # the originals' cosines are the usual similarity table's
    usual = pd.read_parquet(robust_run / "similarity.parquet")
    keys = ["subject_id", "layer", "region_a", "region_b"]
    both = original.merge(usual, on=keys, suffixes=("", "_run"))
    assert len(both) == len(usual) == 7 * 9
    assert np.array_equal(both["cosine"], both["cosine_run"])
    channels = pd.read_csv(robust_run / "robustness_channels.csv")
    assert len(channels) == 9 and set(channels["channels"]) == {32}
    assert channels["share_robust"].between(0, 1).all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_rerun_reuses_every_unit_and_reports_the_same(
    robust_run: Path, cohort_with_a_tiny_region: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    shutil.copytree(robust_run, again)
    args = ["robustness", str(cohort_with_a_tiny_region), "--out", str(again), *OPTIONS]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "0 done, 19 reused, 2 failed of 21 units" in result.output
    for name in ("robustness_similarity.parquet", "robustness.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(robust_run / name), pd.read_parquet(again / name)
        )
    # another seed draws other perturbations: only the originals are reused
    other = [*args, "--perturbation-seed", "7"]
    result = CliRunner().invoke(main, other)
    assert "12 done, 7 reused" in result.output, result.output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_robust_only_tests_only_the_robust_cosines(robust_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(robust_run, folder)
    table = pd.read_parquet(folder / "robustness.parquet")
    chosen = {("conv-1", "tibia", "background"), ("conv-1", "femur", "background")}
    chosen |= {("conv-3", "tibia", "background")}
    table["robust"] = [
        k in chosen for k in zip(table["layer"], table["region_a"], table["region_b"], strict=True)
    ]
    table.to_parquet(folder / "robustness.parquet")
    result = CliRunner().invoke(main, ["stats", str(folder), "--robust-only", str(folder)])
    assert result.exit_code == 0, result.output
    assert "--robust-only:" in result.output
    tests = pd.read_csv(folder / "stats.csv")
    assert "between-features" not in set(tests["family"])
    assert tests["robust_only"].str.startswith("3 of 9 cosines with ICC(1,1) CI low >= 0.9").all()
    pairs = tests[tests["family"] == "between-pairs"]
    assert set(zip(pairs["layer"], pairs["pair"], strict=True)) == {
        ("conv-1", "tibia-background"),
        ("conv-1", "femur-background"),
        ("conv-3", "tibia-background"),
    }
    within = tests[tests["family"] == "within-pairs"]
    assert set(within["layer"]) == {"conv-1"}  # conv-3 has one robust pair: nothing to pair
    ok = tests[tests["status"] == "ok"]
    for _, family in ok.groupby("family"):
        expected = false_discovery_control(family["p_value"].to_numpy(), method="bh")
        assert family["q_value"].to_numpy() == pytest.approx(expected, abs=1e-6)
    expected = false_discovery_control(ok["p_value"].to_numpy(), method="bh")
    assert ok["q_value_run"].to_numpy() == pytest.approx(expected, abs=1e-6)
    run = json.loads((folder / "run.json").read_text())
    assert run["robust_only"] == str(folder.resolve())
    # without the option: every test again, and run.json says so
    assert CliRunner().invoke(main, ["stats", str(folder)]).exit_code == 0
    assert "robust_only" not in pd.read_csv(folder / "stats.csv").columns
    assert json.loads((folder / "run.json").read_text())["robust_only"] is None


def test_robust_only_needs_a_robustness_folder(tmp_path: Path) -> None:
    from cohort.synthetic import synthetic_results

    folder = synthetic_results(tmp_path / "run", n_per_cohort=4, images=False)
    result = CliRunner().invoke(main, ["stats", str(folder), "--robust-only", str(folder)])
    assert result.exit_code == 2
    assert "robustness.parquet does not exist" in result.output


# ------------------------------------------------------------------ a known answer

SHAPE, SPACING = (36, 32, 24), (0.8, 0.8, 1.5)


def _subject(hu: float) -> VolumePair:
    """Two regions of the same shape in every subject; the first one's HU differs."""
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    ball = ((i - 12) * 0.8) ** 2 + ((j - 16) * 0.8) ** 2 + ((k - 12) * 1.5) ** 2 <= 6.0**2
    box = np.zeros(SHAPE, dtype=bool)
    box[24:32, 8:24, 5:19] = True
    labels = np.where(ball, 1, np.where(box, 2, 0)).astype(np.int16)
    image = np.where(ball, hu, np.where(box, 300.0, 0.0)).astype(np.float32)
    image += np.random.default_rng(int(hu)).normal(0.0, 10.0, SHAPE).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    path = Path("known.nii.gz")
    return VolumePair(
        Volume(image, affine, path, "known"), LabelRegions(labels, LABELS, affine, path)
    )


LABELS = (("ball", 1), ("box", 2))


def _interior(pair: VolumePair, mask: np.ndarray) -> np.ndarray:
    """A layer that sees the interior only: the mean HU two voxels inside, and a constant."""
    core = ndimage.binary_erosion(mask, iterations=2)
    return np.array([float(pair.image.data[core].mean()), 500.0])


def _boundary(mask: np.ndarray) -> np.ndarray:
    """A layer that sees the boundary only: the region's boundary faces along each axis."""
    return np.array([float(np.count_nonzero(np.diff(mask, axis=a))) for a in range(3)])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.timeout(120)
def test_an_interior_cosine_is_robust_and_a_boundary_cosine_is_not() -> None:
    cfg = PerturbationConfig(count=4)  # the default chain
    rows = []
    for s, hu in enumerate((150.0, 400.0, 650.0, 900.0, 1200.0, 1500.0)):
        pair = _subject(hu)
        for index in range(1, cfg.count + 1):
            moved, _ = perturb_pair(pair, LABELS, cfg, f"s{s}", index)
            masks = dict(moved.regions.select(["ball", "box"]))
            layers = {
                "interior": _cos(_interior(moved, masks["ball"]), _interior(moved, masks["box"])),
                "boundary": _cos(_boundary(masks["ball"]), _boundary(masks["box"])),
            }
            for layer, cosine in layers.items():
                rows.append((f"s{s}", index, layer, "ball", "box", cosine))
    columns = ["subject_id", "perturbation", "layer", "region_a", "region_b", "cosine"]
    table = icc_rows(pd.DataFrame(rows, columns=columns), cfg.count, 0.9).set_index("layer")
    assert table.loc["interior", "robust"] and table.loc["interior", "icc_low"] >= 0.9
    assert not table.loc["boundary", "robust"] and table.loc["boundary", "icc"] < 0.5
    assert set(table["n_subjects"]) == {6}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_ray_every_perturbation_is_a_unit_with_its_parameters(
    ray_session: str, small_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["robustness", str(small_cohort), "--out", str(out), *OPTIONS, "--executor", "ray"]
    args += ["--actors", "2", "--stall-timeout", "240", "--chain", "translate,rotate"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "18 done, 0 reused, 0 failed of 18 units" in result.output
    similarity = pd.read_parquet(out / "robustness_similarity.parquet")
    perturbed = similarity[similarity["perturbation"] > 0]
    # the parameters came back from the loaders through the feature actors
    assert perturbed["chain"].eq("translate+rotate").all()
    assert (perturbed["rotation_deg"].abs() > 0).all() and (perturbed["noise_sd_hu"] == 0).all()
    assert len(perturbed.groupby(["subject_id", "perturbation"])) == 6 * K


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_report_shows_the_iccs_and_one_subjects_perturbations(
    robust_run: Path, tmp_path: Path
) -> None:
    from cohort.report import write_report

    folder = tmp_path / "run"
    shutil.copytree(robust_run, folder)
    html = write_report(folder).read_text()
    assert 'id="robustness"' in html and 'id="channels"' in html
    for name in ("robustness_forest", "robustness_contours"):
        assert (folder / "report" / f"{name}.png").stat().st_size > 1000
    assert "Subject control-01, coronal slice" in html  # the first finished subject by id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_robustness_prints_the_icc_table(tmp_path: Path) -> None:
    args = ["demo", "--robustness", "--out", str(tmp_path / "demo"), "--per-cohort", "2"]
    result = CliRunner().invoke(main, [*args, "--shape", "64,64,64", "--no-report"])
    assert result.exit_code == 0, result.output
    assert "ICC(1,1) of each cosine over 4 subjects x 10 perturbations" in result.output
    table = pd.read_csv(tmp_path / "demo" / "results" / "robustness.csv")
    assert len(table) == 9 and table["status"].eq("ok").all()
