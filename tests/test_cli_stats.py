"""``cohort stats DIR``: the run's own settings unless an option overrides one."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import StatsConfig
from cohort.outputs.store import PROVENANCE_KEY
from cohort.synthetic import synthetic_results

pytestmark = pytest.mark.timeout(120)


def saved_settings(folder: Path) -> tuple[dict[str, object], dict[str, object]]:
    """The stats settings run.json states, and those stats.parquet's metadata states."""
    run = json.loads((folder / "run.json").read_text())
    meta = json.loads(pq.read_schema(folder / "stats.parquet").metadata[PROVENANCE_KEY])
    return run["config"]["stats"], meta["config"]["stats"]


@pytest.fixture
def no_resampling(tmp_path: Path) -> Path:
    """A finished run made with --permutations 0 --bootstrap 0 (and seed 5, CI 90 %)."""
    cfg = StatsConfig(bootstrap=0, permutations=0, seed=5, ci_level=0.9)
    return synthetic_results(tmp_path / "run", n_per_cohort=5, images=False, cfg=cfg)


def test_stats_without_options_reproduces_the_run(no_resampling: Path) -> None:
    before = pq.read_table(no_resampling / "stats.parquet")
    csvs = {name: (no_resampling / name).read_bytes() for name in ("stats.csv", "similarity.csv")}
    result = CliRunner().invoke(main, ["stats", str(no_resampling)])
    assert result.exit_code == 0, result.output
    after = pq.read_table(no_resampling / "stats.parquet")
    assert after.equals(before)  # values, not only the shape
    for name, content in csvs.items():
        assert (no_resampling / name).read_bytes() == content, name
    in_run, in_parquet = saved_settings(no_resampling)
    assert in_run == in_parquet
    assert (in_run["bootstrap"], in_run["permutations"]) == (0, 0)
    assert (in_run["seed"], in_run["ci_level"]) == (5, 0.9)


def test_an_explicit_option_overrides_and_is_recorded(no_resampling: Path) -> None:
    skipped = pq.read_table(no_resampling / "stats.parquet").to_pandas()
    permanova = skipped[skipped["test"] == "permanova"]
    assert set(permanova["reason"]) == {"permutations is 0"}
    result = CliRunner().invoke(main, ["stats", str(no_resampling), "--permutations", "99"])
    assert result.exit_code == 0, result.output
    in_run, in_parquet = saved_settings(no_resampling)
    assert in_run == in_parquet
    assert in_run["permutations"] == 99
    assert (in_run["bootstrap"], in_run["seed"]) == (0, 5)  # the others kept
    tests = pq.read_table(no_resampling / "stats.parquet").to_pandas()
    ran = tests[tests["test"] == "permanova"]
    assert (ran["status"] == "ok").all()
    assert ran["p_value"].between(1 / 100, 1).all()
    assert tests.loc[tests["test"] == "mannwhitneyu", "ci_low"].isna().all()  # bootstrap 0


def test_stats_on_a_folder_that_is_not_a_run_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["stats", str(tmp_path)])
    assert result.exit_code == 2
    assert "run.json is missing" in result.output
