"""Shared fixtures: one Ray instance per test session and small phantom cohorts.

The Ray instance has 2 CPUs and one *fake* GPU resource: it lets the tests
check that actors ask for the GPU (the scheduling path) on a machine without
one; the actor itself then finds no CUDA device and runs on the CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohort.synthetic import make_phantom_cohort

# what cohort keeps in the user's cache (e.g. the model's reach) goes to a fresh folder
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="cohort-test-cache-")

# A test that uses the session's small_run may be the one that pays for it (a Ray run
# of six subjects: 30 s idle, more than 120 s on a loaded 2-core machine), so its
# bound is at least this, whatever its module says (the bound is on hangs).
SMALL_RUN_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "small_run" not in getattr(item, "fixturenames", ()):
            continue
        marker = item.get_closest_marker("timeout")
        if marker is None or not marker.args or marker.args[0] < SMALL_RUN_TIMEOUT_S:
            item.add_marker(pytest.mark.timeout(SMALL_RUN_TIMEOUT_S), append=False)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL_SHAPE = (64, 64, 64)  # DenseNet121's block 4 sees a 2x2x2 grid


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's Ray instance; its GCS address as ``ray.init`` reported it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if ray.is_initialized():  # a run that failed before the fixture left its own up
        ray.shutdown()
    context = ray.init(
        address="local",  # private: never join a cluster another process left running
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield str(context.address_info["gcs_address"])
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cohorts of three 64^3 phantom knees; returns the manifest path."""
    folder = tmp_path_factory.mktemp("small-cohort")
    return make_phantom_cohort(folder, n_per_cohort=3, shape=SMALL_SHAPE, seed=11)


SMALL_RUN_OPTIONS = ("--weights", "random", "--device", "cpu")  # the ones that set the numbers


@pytest.fixture(scope="session")
def small_run(
    ray_session: None, small_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A local ``cohort run`` of the small cohort (default masked-pool, random weights)."""
    from click.testing import CliRunner

    from cohort.cli.main import main

    out = tmp_path_factory.mktemp("small-run") / "out"
    args = ["run", str(small_cohort), "--out", str(out), *SMALL_RUN_OPTIONS, "--actors", "2"]
    args += ["--quiet", "--stall-timeout", "240", "--bootstrap", "200", "--no-report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out
