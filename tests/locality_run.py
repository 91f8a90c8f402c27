"""The pipeline's stream on two raylets, each with a feature actor: where each subject
was prepared and where it was consumed.

Run by ``tests/test_locality.py`` in its own process (a second Ray instance cannot
share the test session's): a local cluster whose head has no CPUs and two nodes of
2 CPUs and one logical GPU each, so that the pool of two actors (one per "GPU", the
network on the CPU) puts one actor on each node; the loaders may run on either.
Prints one JSON line: per subject its status and the nodes it was loaded and
consumed on, and the node of each actor.

    python tests/locality_run.py MANIFEST
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cohort.config import ExecutionConfig, ModelConfig, RunConfig
from cohort.execution import graph
from cohort.execution.plan import stream_rows
from cohort.execution.session import ActorMemory, Pool
from cohort.inputs.manifest import read_manifest
from cohort.model.network import random_weights


def main(manifest: Path) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    ray.init(address=cluster.address, log_to_driver=False)
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cfg = RunConfig(
        model=ModelConfig(weights="random"),
        execution=ExecutionConfig(device="cpu", max_retries=0, stall_timeout_s=240),
    )
    rows = stream_rows(tuple(read_manifest(manifest)), cfg)
    weights = random_weights(cfg.model.backbone, 0).state_dict
    memory = ActorMemory(2**30, 256 * 2**20, "test")
    results = [
        {
            "subject_id": str(r["subject_id"]),
            "status": str(r["status"]),
            "message": str(r["message"]),
            "loaded_on": str(r["loaded_on"]),
            "consumed_on": str(r["consumed_on"]),
        }
        for r in graph.stream(rows, weights, cfg, "loc", frozenset(), Pool(2, 1.0, 1), memory)
    ]
    gpu_nodes = sorted(
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0
    )
    print("LOCALITY " + json.dumps({"rows": results, "gpu_nodes": gpu_nodes}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
