"""A ``cohort run`` on a two-node Ray cluster whose worker node is killed mid-run.

Run by ``tests/test_reliability.py::test_a_lost_node_loses_nothing`` in its own
process (a second Ray instance cannot share the test session's): the head node
has no CPUs, so every loader and actor runs on the worker node; when two subjects
are finished and the test hook holds up the last one (``COHORT_FAULT_MODE=hang:S``,
whose marker the test names), the worker node is killed (no graceful shutdown)
and a new one joins, as an autoscaler would replace it: the run cannot have ended
before the kill, however busy the machine. Prints one JSON line with what happened.

    python tests/node_loss_run.py MANIFEST OUT
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cohort.config import ExecutionConfig, ModelConfig, RunConfig, StatsConfig
from cohort.execution import driver
from cohort.outputs import store


def main(manifest: Path, out: Path) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    ray.init(address=cluster.address, log_to_driver=False)  # the driver is on the head
    worker = cluster.add_node(num_cpus=2)
    cfg = RunConfig(
        model=ModelConfig(weights="random"),
        execution=ExecutionConfig(
            device="cpu",
            num_actors=1,
            progress="quiet",
            stall_timeout_s=float(os.environ.get("NODE_LOSS_STALL_S", "240")),
        ),
        stats=StatsConfig(bootstrap=20, permutations=9),
    )
    events: dict[str, object] = {}
    outcome: list[driver.RunResult] = []
    started = time.monotonic()
    # the run in a thread: the node is killed and replaced from the main thread
    # (starting a node installs signal handlers, which only the main thread may)
    run = threading.Thread(
        target=lambda: outcome.append(driver.run(manifest, out, cfg, download=False)),
        daemon=True,
    )
    run.start()
    parts = store.Parts(out)
    hung = Path(os.environ["COHORT_FAULT_MARKER"])  # written when the hang begins
    while (len(parts.keys()) < 2 or not hung.exists()) and run.is_alive():
        time.sleep(0.1)
    events["parts_when_killed"] = len(parts.keys())
    cluster.remove_node(worker, allow_graceful=False)
    events["killed_at_s"] = time.monotonic() - started
    cluster.add_node(num_cpus=2)
    run.join()
    result = outcome[0]
    events.update(done=result.done, failed=result.failed, seconds=time.monotonic() - started)
    print("NODE-LOSS " + json.dumps(events), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
