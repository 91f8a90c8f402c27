"""One ``cohort run`` in its own process, measured from inside.

``python -m bench.probe MANIFEST OUT --pooling MODE --json PATH`` runs
:func:`cohort.execution.driver.run` exactly as ``cohort run`` does and writes a JSON
with the wall time, the time each subject's result reached the driver, the
driver's peak RSS (its own process, so earlier runs cannot inflate it) and the
peak RSS of the busiest feature actor.

The one intrusion is a wrapper around ``graph.stream`` and ``inprocess.stream``
that notes when each row arrives; the rows themselves pass through unchanged.
``--executor`` is passed on (default ``auto``: a cohort of at most 64 subjects
runs in-process, and then there is no feature actor to measure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

from bench.measure import ProcessPeak, peak_rss_mib
from cohort.config import Executor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pooling", default="masked-pool")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--actor-cpus", type=float, default=0.25)
    parser.add_argument("--loader-cpus", type=float, default=0.5)
    parser.add_argument("--executor", default="auto", choices=get_args(Executor))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--warm",
        action="store_true",
        help="start Ray before the clock starts, as a running cluster would be",
    )
    args = parser.parse_args(argv)

    from cohort.config import (
        ExecutionConfig,
        ModelConfig,
        PoolingConfig,
        RunConfig,
        StatsConfig,
    )
    from cohort.execution import driver, graph, inprocess, session

    cfg = RunConfig(
        model=ModelConfig(weights=args.weights, precision=args.precision),
        pooling=PoolingConfig(mode=args.pooling),
        execution=ExecutionConfig(
            device=args.device,
            executor=args.executor,
            num_actors=args.actors,
            torch_threads=args.threads,
            actor_cpus=args.actor_cpus,
            loader_cpus=args.loader_cpus,
            progress="quiet",
            stall_timeout_s=600,
        ),
        stats=StatsConfig(bootstrap=200, permutations=99),
    )
    arrivals: list[float] = []

    def timed(stream: Any) -> Any:
        def timed_stream(*a: Any, **k: Any) -> Iterator[dict[str, Any]]:
            for row in stream(*a, **k):
                arrivals.append(time.perf_counter())
                yield row

        return timed_stream

    graph.stream = timed(graph.stream)
    inprocess.stream = timed(inprocess.stream)
    if args.warm:
        session.ensure_ray(None)
    started = time.perf_counter()
    with ProcessPeak("FeatureActor") as actors:
        result = driver.run(args.manifest, args.out, cfg, download=False)
    wall = time.perf_counter() - started
    report = {
        "pooling": args.pooling,
        "precision": args.precision,
        "warm": args.warm,
        "executor": result.executor,
        "subjects": result.subjects,
        "done": result.done,
        "failed": result.failed,
        "wall_s": wall,
        "first_s": arrivals[0] - started if arrivals else None,
        "last_s": arrivals[-1] - started if arrivals else None,
        "steady_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        if len(arrivals) > 1 and arrivals[-1] > arrivals[0]
        else None,
        "driver_peak_mib": peak_rss_mib(),
        "actor_peak_mib": actors.peak_mib,
        "actor_processes": len(actors.peak_kib),
    }
    args.json.write_text(json.dumps(report, indent=2))

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    main()
