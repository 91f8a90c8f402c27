"""The pipeline end to end through Ray, against direct calls of the core."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner, Result
from scipy import stats as sps

from cohort.cli.main import main
from cohort.config import ModelConfig, PreprocessConfig
from cohort.inputs.manifest import read_manifest, write_manifest
from cohort.inputs.preprocess import air_value
from cohort.model.hooks import resolve_layers
from cohort.model.network import build_network, random_weights
from cohort.outputs.store import PROVENANCE_KEY
from cohort.report import write_report
from tests.direct import direct_masked_input

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

FAST = [
    "--weights",
    "random",
    "--quiet",
    "--stall-timeout",
    "240",
    "--bootstrap",
    "200",
    "--no-report",
]


def cohort_run(manifest: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def finished(small_run: Path) -> Path:
    return small_run


def test_outputs_have_the_contract_columns_and_types(finished: Path, small_cohort: Path) -> None:
    subjects = {s.subject_id: s.cohort for s in read_manifest(small_cohort)}
    features = pq.read_table(finished / "features.parquet")
    assert features.schema.field("vector").type == pa.list_(pa.float32())
    assert features.schema.field("channels").type == pa.int32()
    frame = features.to_pandas()
    assert set(frame.subject_id) == set(subjects)
    assert len(frame) == len(subjects) * 3 * 3  # regions x layers
    assert set(frame.region) == {"tibia", "femur", "background"}
    assert set(frame.layer) == {"conv-1", "conv-3", "conv-5"}
    assert set(frame.layer_name) == {
        "features.denseblock4.denselayer16.conv2",
        "features.denseblock4.denselayer15.conv2",
        "features.denseblock4.denselayer14.conv2",
    }
    assert all(len(v) == c == 32 for v, c in zip(frame.vector, frame.channels, strict=True))
    assert (frame.voxels > 0).all()
    assert dict(zip(frame.subject_id, frame.cohort, strict=True)) == subjects

    similarity = pq.read_table(finished / "similarity.parquet")
    assert similarity.schema.field("cosine").type == pa.float64()
    sim = similarity.to_pandas()
    assert len(sim) == len(subjects) * 3 * 3  # pairs x layers
    assert sim.cosine.between(-1, 1).all()

    for name in ("features", "similarity", "stats", "errors"):
        metadata = pq.read_schema(finished / f"{name}.parquet").metadata
        provenance = json.loads(metadata[PROVENANCE_KEY])
        assert provenance["weights"]["source"] == "random"
    stats = pq.read_table(finished / "stats.parquet").to_pandas()
    for column in (
        "family", "cohort", "layer", "pair", "test", "n", "statistic", "p_value", "q_value",
        "effect_size", "effect_name", "ci_low", "ci_high",
    ):  # fmt: skip
        assert column in stats.columns
    assert pd.read_csv(finished / "errors.csv").empty
    run = json.loads((finished / "run.json").read_text())
    assert run["counts"] == {"subjects": 6, "done": 6, "cached": 0, "failed": 0}
    assert len(run["weights"]["sha256"]) == 64
    assert run["versions"]["torch"] == torch.__version__
    import monai
    import SimpleITK

    assert run["versions"]["monai"] == monai.__version__
    assert run["versions"]["SimpleITK"] == SimpleITK.__version__
    assert run["config"]["preprocess"]["hu_min"] == -1000.0


def test_similarity_csv_is_the_origin_table(finished: Path) -> None:
    table = pd.read_csv(finished / "similarity.csv")
    sim = pq.read_table(finished / "similarity.parquet").to_pandas()
    assert list(table.columns[-3:]) == ["conv-1", "conv-3", "conv-5"]
    assert set(table.pair) == {"tibia-femur", "tibia-background", "femur-background"}
    osteo = sim[(sim.cohort == "osteo") & (sim.layer == "conv-3")]
    expected = osteo[(osteo.region_a == "tibia") & (osteo.region_b == "background")].cosine.mean()
    row = table[(table.cohort == "osteo") & (table.pair == "tibia-background")]
    assert row["conv-3"].item() == pytest.approx(expected, abs=1e-6)


def test_duckdb_reads_results_without_cohort(finished: Path) -> None:
    con = duckdb.connect()
    rows = con.execute(
        "SELECT cohort, layer, avg(cosine) AS mean, count(*) AS n "
        f"FROM read_parquet('{finished / 'similarity.parquet'}') "
        "WHERE region_a = 'tibia' AND region_b = 'femur' GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert len(rows) == 6
    assert all(n == 3 for *_, n in rows)
    dims = con.execute(
        f"SELECT DISTINCT len(vector) FROM read_parquet('{finished / 'features.parquet'}')"
    ).fetchall()
    assert dims == [(32,)]


def test_masked_input_through_ray_equals_direct_core_call(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "masked-input"
    result = cohort_run(small_cohort, out, "--pooling", "masked-input", "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = pq.read_table(out / "features.parquet").to_pandas()

    cfg = PreprocessConfig()
    subject_id, _, direct = direct_masked_input("densenet121", small_cohort, cfg, air_value(cfg))
    mine = got[got.subject_id == subject_id]
    assert len(mine) == len(direct) == 9
    for vector in direct:
        row = mine[(mine.region == vector.region) & (mine.layer == vector.layer)]
        np.testing.assert_allclose(np.asarray(row.vector.item()), vector.vector, rtol=0, atol=1e-5)


def test_masked_pool_through_ray_equals_pooling_done_here(
    finished: Path, small_cohort: Path
) -> None:
    """The default path's vectors against masked pooling computed in this test: the model
    input from the NIfTI files by hand, the feature maps from plain forward hooks, each
    region's cell weights by block-averaging its mask (64^3 volume, 2^3 grid: 32^3 blocks)."""
    got = pq.read_table(finished / "features.parquet").to_pandas()
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    paths = {info.layer: info.module_path for info in resolve_layers(network, ModelConfig().layers)}
    for subject in read_manifest(small_cohort):
        image, mask = nib.load(subject.image), nib.load(subject.mask)
        assert np.allclose(image.affine[:3, :3], np.diag(np.diag(image.affine[:3, :3])))
        assert (np.diag(image.affine)[:3] > 0).all()  # stored RAS: (x, y, z) -> (D, H, W) below
        hu = np.asarray(image.get_fdata(), dtype=np.float64).transpose(2, 1, 0)
        labels = np.asarray(mask.dataobj).transpose(2, 1, 0)
        x = ((np.clip(hu, -1000, 2000) + 1000) / 3000 - 0.449) / 0.226
        maps: dict[str, torch.Tensor] = {}
        handles = [
            network.get_submodule(path).register_forward_hook(
                lambda _m, _i, out, layer=layer, maps=maps: maps.__setitem__(layer, out)
            )
            for layer, path in paths.items()
        ]
        with torch.no_grad():
            network(torch.tensor(x, dtype=torch.float32)[None, None])
        for handle in handles:
            handle.remove()
        regions = {
            "tibia": labels == 1,
            "femur": labels == 2,
            "background": ~np.isin(labels, [1, 2]),
        }
        mine = got[got.subject_id == subject.subject_id]
        for layer, fmap in maps.items():
            f = fmap[0].double().numpy()  # (C, 2, 2, 2)
            assert f.shape[1:] == (2, 2, 2)
            for name, region in regions.items():
                w = region.reshape(2, 32, 2, 32, 2, 32).mean(axis=(1, 3, 5))
                expected = (f * w).sum(axis=(1, 2, 3)) / w.sum()
                row = mine[(mine.region == name) & (mine.layer == layer)]
                vector = np.asarray(row.vector.item(), dtype=np.float64)
                scale = np.abs(expected).max()
                np.testing.assert_allclose(vector, expected, rtol=0, atol=1e-5 * scale)


def test_actors_ask_for_the_gpu_when_the_cluster_has_one(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    # the session's Ray instance advertises one (fake) GPU; --device auto must request it
    manifest = write_manifest(read_manifest(small_cohort)[:1], tmp_path / "one.csv")
    result = cohort_run(manifest, tmp_path / "out")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    (device,) = run["device"]
    assert "GPU=1" in device
    assert device.startswith("cpu")  # no CUDA here: the actor falls back to the CPU


def test_bf16_on_the_cpu_is_refused_before_any_work(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    result = cohort_run(small_cohort, tmp_path / "out", "--device", "cpu", "--precision", "bf16")
    assert result.exit_code == 2, result.output
    assert "--precision bf16" in result.output and "CUDA" in result.output
    assert not (tmp_path / "out" / "features.parquet").exists()


@pytest.mark.parametrize(
    ("device", "precision", "gpus", "refused"),
    [
        ("cuda", "fp32", 0, "no GPU resource"),
        ("auto", "bf16", 0, "--precision bf16"),
        ("cpu", "bf16", 1, "--precision bf16"),
        ("auto", "bf16", 2, None),
        ("cuda", "bf16", 1, None),
    ],
)
def test_device_and_precision_are_checked_against_the_cluster(
    device: str, precision: str, gpus: int, refused: str | None
) -> None:
    from cohort.config import ExecutionConfig, RunConfig
    from cohort.errors import ConfigError
    from cohort.execution import session

    cluster = session.RayInstance(False, "head:6379", cpus=8.0, gpus=float(gpus))
    cfg = RunConfig(
        model=ModelConfig(precision=precision),  # type: ignore[arg-type]
        execution=ExecutionConfig(device=device),  # type: ignore[arg-type]
    )
    if refused is None:
        # one actor per GPU, one GPU each
        assert session.plan_pool(cfg, cluster) == (gpus, 1.0, None)
    else:
        with pytest.raises(ConfigError, match=refused):
            session.plan_pool(cfg, cluster)


def test_per_row_label_map_swaps_numbering(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    """A mask numbered the other way round gives the same vectors with a per-row map."""
    subject = read_manifest(small_cohort)[0]
    mask = nib.load(subject.mask)
    data = np.asarray(mask.dataobj)
    swapped = np.where(data == 1, 2, np.where(data == 2, 1, data)).astype(np.uint8)
    swapped_path = tmp_path / "swapped.nii.gz"
    nib.save(nib.Nifti1Image(swapped, mask.affine, mask.header), swapped_path)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(
        {
            "subject_id": ["plain", "swapped"],
            "image": [subject.image, subject.image],
            "mask": [subject.mask, swapped_path],
            "labels": ["", "tibia=2,femur=1"],
        }
    ).to_csv(manifest, index=False)
    result = cohort_run(manifest, tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    frame = pq.read_table(tmp_path / "out" / "features.parquet").to_pandas()
    plain = frame[frame.subject_id == "plain"].set_index(["region", "layer"])
    other = frame[frame.subject_id == "swapped"].set_index(["region", "layer"])
    assert (plain.voxels == other.voxels.loc[plain.index]).all()
    for key in plain.index:
        np.testing.assert_array_equal(plain.vector[key], other.vector[key])


def test_bad_manifest_exits_2_and_failed_subject_exits_1(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("subject_id,image\na,b.nii.gz\n")
    result = cohort_run(bad, tmp_path / "never")
    assert result.exit_code == 2
    assert "mask" in result.output

    folder = tmp_path / "data"
    shutil.copytree(small_cohort.parent, folder)
    (folder / "masks" / "osteo-02.nii.gz").unlink()
    out = tmp_path / "partial"
    result = cohort_run(folder / "manifest.csv", out, "--device", "cpu")
    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.subject_id) == ["osteo-02"]
    assert errors.stage.item() == "load"
    assert "osteo-02.nii.gz" in errors.message.item()
    done = pq.read_table(out / "features.parquet").to_pandas()
    assert set(done.subject_id) == {s.subject_id for s in read_manifest(small_cohort)} - {
        "osteo-02"
    }


def test_stats_command_reproduces_stats_exactly(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "stats.parquet").unlink()
    (copy / "stats.csv").unlink()
    result = CliRunner().invoke(main, ["stats", str(copy), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert (copy / "stats.csv").read_bytes() == (finished / "stats.csv").read_bytes()
    again = pq.read_table(copy / "stats.parquet")
    original = pq.read_table(finished / "stats.parquet")
    assert again.equals(original)
    assert again.schema.metadata == original.schema.metadata
    # other options give other numbers, and say so in the provenance
    result = CliRunner().invoke(
        main, ["stats", str(copy), "--bootstrap", "100", "--stats-seed", "3"]
    )
    assert result.exit_code == 0, result.output
    changed = pq.read_table(copy / "stats.parquet")
    assert not changed.equals(original)
    provenance = json.loads(changed.schema.metadata[PROVENANCE_KEY])
    assert provenance["config"]["stats"]["seed"] == 3


def assert_one_meaning(folder: Path, centred: bool) -> None:
    """similarity.csv, stats, run.json, the Parquet metadata and the report all use the
    same cosines: similarity.parquet's ``cosine_centred`` when centred, else ``cosine``."""
    column = "cosine_centred" if centred else "cosine"
    sim = pq.read_table(folder / "similarity.parquet").to_pandas()
    table = pd.read_csv(folder / "similarity.csv")
    assert set(table["cosine"]) == {"centred" if centred else "raw"}
    for row in table.itertuples():
        a, b = row.pair.split("-")
        for layer in ("conv-1", "conv-3", "conv-5"):
            values = sim[
                (sim.cohort == row.cohort)
                & (sim.layer == layer)
                & (sim.region_a == a)
                & (sim.region_b == b)
            ][column]
            assert table.loc[row.Index, layer] == pytest.approx(values.mean(), abs=1e-6)
    run = json.loads((folder / "run.json").read_text())
    meta = json.loads(pq.read_schema(folder / "stats.parquet").metadata[PROVENANCE_KEY])
    assert run["config"]["stats"]["centre"] is centred
    assert meta["config"]["stats"]["centre"] is centred
    tests = pq.read_table(folder / "stats.parquet").to_pandas()
    mw = tests[(tests.test == "mannwhitneyu") & (tests.layer == "conv-1")]
    for row in mw.itertuples():
        a, b = row.pair.split("-")
        pick = sim[(sim.layer == "conv-1") & (sim.region_a == a) & (sim.region_b == b)]
        x = pick[pick.cohort == "control"][column]
        y = pick[pick.cohort == "osteo"][column]
        assert row.p_value == pytest.approx(sps.mannwhitneyu(x, y).pvalue, rel=1e-12)
    page = write_report(folder).read_text()
    assert ("Cosines are <b>centred</b>" in page) is centred
    first = table.iloc[0]
    assert f">{first['conv-1']:.4f}<" in page  # the report's table shows these numbers


def test_centred_run_means_one_thing_everywhere(
    ray_session: None, small_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "centred"
    result = cohort_run(small_cohort, out, "--device", "cpu", "--centre", "--permutations", "9")
    assert result.exit_code == 0, result.output
    assert "(centred cosines)" in result.output
    assert_one_meaning(out, centred=True)
    for option, centred in (("--raw", False), ("--centre", True)):
        result = CliRunner().invoke(main, ["stats", str(out), option])
        assert result.exit_code == 0, result.output
        assert_one_meaning(out, centred=centred)


@pytest.mark.slow
def test_feature_test_finds_the_planted_bone_difference(ray_session: None, tmp_path: Path) -> None:
    """The demo phantom's second cohort has less dense, coarser trabecular bone.

    With seeded random weights the deepest layers do not carry that texture (a
    random network's block-4 features barely change with it), so this test hooks
    the first two dense blocks, where random filters still see intensity and
    texture. The bone regions must differ (q < 0.05), and more strongly than the
    background, which the phantom leaves alike except where grid cells straddle bone.
    """
    from cohort.synthetic import make_phantom_cohort

    manifest = make_phantom_cohort(tmp_path / "data", n_per_cohort=7, shape=(64, 64, 64), seed=5)
    out = tmp_path / "out"
    layers = "features.denseblock1,features.denseblock2"
    result = cohort_run(
        manifest, out, "--device", "cpu", "--layers", layers, "--permutations", "499"
    )
    assert result.exit_code == 0, result.output
    tests = pd.read_csv(out / "stats.csv")
    features = tests[(tests.family == "between-features") & (tests.status == "ok")]
    assert len(features) == 6  # 3 regions x 2 layers
    bone = features[features.pair.isin(["tibia", "femur"])]
    assert (bone.q_value < 0.05).all(), bone.to_string()
    effect = features.set_index(["layer", "pair"]).effect_size
    for layer in layers.split(","):
        assert min(effect[layer, "tibia"], effect[layer, "femur"]) > effect[layer, "background"]
