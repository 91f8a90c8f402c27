"""Loader locality on two raylets: where each subject is loaded, where it is consumed.

::

    python -m bench.loader --make DIR   # with a small --shape, or any pair
    python -m bench.locality --data DIR --subjects 16

A local two-node cluster (``ray.cluster_utils.Cluster``: a head without CPUs,
two nodes of 2 CPUs and one logical GPU each, so that the pool puts one actor
on each) runs the pipeline's stream with the pass-through actor of
``bench/feed.py``; every result row says the node its subject was loaded on
and the one it was consumed on (:mod:`cohort.execution.placement`). Prints how
many subjects were consumed on the node that loaded them, and how the loaders
and the actors' work split between the nodes.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from bench.feed import PassThroughActor, manifest_rows
from cohort.config import ExecutionConfig, ModelConfig, RunConfig
from cohort.execution import graph
from cohort.execution.session import ActorMemory, Pool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=16)
    args = p.parse_args(argv)
    data, n = args.data, args.subjects
    head = {"num_cpus": 0, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address, log_to_driver=False)
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)  # a logical GPU: one actor per node
    graph.FeatureActor = PassThroughActor  # type: ignore[misc]
    execution = ExecutionConfig(device="cpu", executor="ray", max_retries=0)
    cfg = RunConfig(model=ModelConfig(weights="random"), execution=execution)
    memory = ActorMemory(2**30, 256 * 2**20, "bench")
    pairs = [
        (str(r["loaded_on"]), str(r["consumed_on"]))
        for r in graph.stream(
            manifest_rows(data, n), {}, cfg, "loc", frozenset(), Pool(2, 1.0, 1), memory
        )
    ]
    report = {
        "local": sum(a == b for a, b in pairs),
        "subjects": len(pairs),
        "loaded_on": Counter(a[:6] for a, _ in pairs),
        "consumed_on": Counter(b[:6] for _, b in pairs),
    }
    print("LOCALITY " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
