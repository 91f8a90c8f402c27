"""The private Ray instance of a local run keeps its idle worker processes.

Runs in a fresh interpreter: the test session's own Ray instance is started by
conftest, not by :func:`cohort.execution.session.ensure_ray`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cohort.synthetic import make_phantom_cohort
from tests.conftest import SMALL_SHAPE
from tests.processes import python_stdout

# Six tasks of half a CPU at a time on 2 CPUs need more worker processes than CPUs;
# after an idle pause longer than Ray's default threshold (1 s) the same processes must
# serve the second round: with Ray's default they are stopped and new ones started.
_ROUNDS = """
import json, os, time
os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray
from cohort.execution.session import ensure_ray

os.environ.pop("RAY_ADDRESS", None)
ensure_ray(None)

import tempfile
from pathlib import Path

@ray.remote(num_cpus=0.5)
def pid(arrived, wait):
    # each task waits until three are running at once (or 60 s), so that the first
    # round needs at least three processes however slowly a busy machine starts them
    Path(arrived, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(arrived)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(wait)
    return os.getpid()

def round_():
    arrived = tempfile.mkdtemp()
    return sorted(set(ray.get([pid.remote(arrived, 1.0) for _ in range(6)])))

first = round_()
time.sleep(3.0)
second = round_()
print(json.dumps({"first": first, "second": second}))
ray.shutdown()
"""


@pytest.mark.timeout(120)
def test_private_instance_keeps_idle_workers_between_rounds() -> None:
    out = json.loads(python_stdout(_ROUNDS, timeout=110).strip().splitlines()[-1])
    assert len(out["first"]) > 2, out  # more worker processes than CPUs were needed
    assert set(out["second"]) <= set(out["first"]), out  # no process was started anew


_RUN = """
import json, os, sys
from pathlib import Path
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.pop("RAY_ADDRESS", None)
import ray
from cohort.config import ExecutionConfig, ModelConfig, RunConfig, StatsConfig
from cohort.execution import driver

cfg = RunConfig(
    model=ModelConfig(weights="random"),
    execution=ExecutionConfig(
        device="cpu", executor="ray", progress="quiet", stall_timeout_s=240
    ),
    stats=StatsConfig(bootstrap=20, permutations=9),
)
result = driver.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg, download=False)
print(json.dumps({"done": result.done, "failed": result.failed, "ray_up": ray.is_initialized()}))
"""


@pytest.mark.timeout(240)
def test_a_run_stops_its_own_instance_and_publishes_everything(tmp_path: Path) -> None:
    """A run that started its private instance stops it while the reducer works; the
    results are all published."""
    manifest = make_phantom_cohort(tmp_path / "cohort", n_per_cohort=1, shape=SMALL_SHAPE, seed=3)
    out = tmp_path / "out"
    printed = python_stdout(_RUN, str(manifest), str(out), timeout=230)
    outcome = json.loads(printed.strip().splitlines()[-1])
    assert outcome == {"done": 2, "failed": 0, "ray_up": False}
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["done"] == 2
    assert run["ray"]["private"] is True
    assert run["ray"]["cpus"] == os.cpu_count()
    for table in ("features", "similarity", "stats"):
        assert (out / f"{table}.parquet").is_file(), table


def test_a_run_in_a_running_ray_says_so(small_run: Path, ray_session: str) -> None:
    """A run that joined a Ray instance (here the test session's) records it as joined,
    with that instance's address (as ray.init gave it) and resources (conftest: 2 CPUs
    and one fake GPU)."""
    ran_on = json.loads((small_run / "run.json").read_text())["ray"]
    assert ran_on["private"] is False
    assert (ran_on["cpus"], ran_on["gpus"]) == (2.0, 1.0)
    assert ran_on["address"] == ray_session


_REFUSED = """
import json, os, sys
from pathlib import Path
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.pop("RAY_ADDRESS", None)
import ray
from cohort.config import ExecutionConfig, ModelConfig, RunConfig
from cohort.errors import CohortError
from cohort.execution import driver

cfg = RunConfig(
    model=ModelConfig(weights="random", precision=sys.argv[3]),
    execution=ExecutionConfig(device="cpu", executor="ray", progress="quiet"),
)
try:
    driver.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg, download=False)
except CohortError as err:
    print(json.dumps({"refused": str(err), "ray_up": ray.is_initialized()}))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("refusal", ["manifest", "bf16 on the CPU"])
def test_a_refused_run_stops_the_ray_it_started(tmp_path: Path, refusal: str) -> None:
    """The plan is checked while Ray starts, and the actors are sized once it is up;
    when either refuses the run (an unusable manifest; bf16 asked for on the CPU), the
    private Ray this run started is stopped before the error, so an in-process caller
    (a notebook, a test) is not left holding it."""
    if refusal == "manifest":
        manifest = tmp_path / "manifest.csv"
        manifest.write_text("subject_id,image\ns1,a.nii.gz\n")  # no mask column
        precision, said = "fp32", "mask"
    else:
        manifest = make_phantom_cohort(tmp_path / "c", n_per_cohort=1, shape=(48, 64, 64))
        precision, said = "bf16", "--precision bf16"
    out = tmp_path / "out"
    printed = python_stdout(_REFUSED, str(manifest), str(out), precision, timeout=110)
    outcome = json.loads(printed.strip().splitlines()[-1])
    assert said in outcome["refused"], outcome
    assert outcome["ray_up"] is False


_SEVERAL_GPUS = """
import json, os, sys
from pathlib import Path
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.pop("RAY_ADDRESS", None)
import torch
torch.cuda.device_count = lambda: 2  # as on a machine with two GPUs
from cohort.config import ExecutionConfig, ModelConfig, RunConfig, StatsConfig
from cohort.execution import driver

cfg = RunConfig(
    model=ModelConfig(weights="random"),
    execution=ExecutionConfig(progress="quiet", stall_timeout_s=100),
    stats=StatsConfig(bootstrap=20, permutations=9),
)
result = driver.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg, download=False)
print(json.dumps({"done": result.done, "where": result.where()}))
"""


@pytest.mark.timeout(180)
def test_a_small_run_that_sees_several_gpus_goes_to_ray(tmp_path: Path) -> None:
    """auto keeps a small local run in-process until torch, once imported, counts more
    than one CUDA device: then the run starts its private Ray for one actor per GPU
    (Ray here finds no real GPU, so its one actor runs on the CPU)."""
    manifest = make_phantom_cohort(tmp_path / "c", n_per_cohort=1, shape=(48, 64, 64))
    out = tmp_path / "out"
    printed = python_stdout(_SEVERAL_GPUS, str(manifest), str(out), timeout=170)
    outcome = json.loads(printed.strip().splitlines()[-1])
    assert outcome["done"] == 2
    assert outcome["where"].startswith("on a private local Ray"), outcome
    assert json.loads((out / "run.json").read_text())["executor"] == "ray"
