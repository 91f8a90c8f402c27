"""The private Ray instance of a local run keeps its idle worker processes.

Runs in a fresh interpreter: the test session's own Ray instance is started by
conftest, not by :func:`cohort.execution.session.ensure_ray`.
"""

from __future__ import annotations

import json

import pytest

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

@ray.remote(num_cpus=0.5)
def pid(wait):
    time.sleep(wait)
    return os.getpid()

def round_():
    return sorted(set(ray.get([pid.remote(1.0) for _ in range(6)])))

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
