"""The least whole-process time a Ray-based run can take on this machine.

    python -m bench.startup_floor --subjects 22 --shape 96,128,128

The floor under ``bench.startup``: one process that does only what any design
that streams subjects through a Ray actor holding the network must do, and
nothing of cohort's own work around it:

* start a private Ray instance (:func:`cohort.execution.session.ensure_ray`), or
  with ``--address`` join one that is already running (``ray start --head``);
* a Ray Data pipeline of one row per subject through one actor (a quarter
  CPU, like cohort's feature actor), which imports torch, builds cohort's
  network (DenseNet121, seeded random weights, factorised, the default hooked
  layers) and pools the three regions of a random volume per row
  (:func:`cohort.model.pooling.extract`, in the given pooling mode);
* ``ray.shutdown`` and the interpreter's exit.

No manifest, files, loaders, planning, statistics or output. Each pooling mode
runs as its own process, timed from outside from start to exit, one after the
other; ``--loop-s`` (the plain loop's seconds from ``bench.startup``, measured on
the same machine just before) turns each time into the largest ratio to the
loop that a run of that mode can reach here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench import timed

_CHILD = "--child"


class Extract:
    """The feature actor reduced to the model: build once, pool a random subject per row."""

    def __init__(self, shape: tuple[int, int, int], mode: str) -> None:
        import torch

        from cohort.config import ModelConfig, PoolingConfig
        from cohort.model.hooks import FeatureExtractor, resolve_layers
        from cohort.model.network import build_network, load_weights

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        model = ModelConfig(weights="random")
        network, _ = build_network(model.backbone, load_weights(model).state_dict)
        self.extractor = FeatureExtractor(network, resolve_layers(network, model.layers))
        self.pooling = PoolingConfig(mode=mode)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(0)
        self.image = torch.randn(shape, generator=generator)
        index = torch.zeros(shape, dtype=torch.int64)
        index[: shape[0] // 3] = 1
        index[shape[0] // 3 : 2 * shape[0] // 3] = 2
        self.index = index

    def __call__(self, batch: dict[str, object]) -> dict[str, object]:
        from cohort.model.pooling import extract

        names = ("background", "tibia", "femur")
        vectors = extract(self.extractor, self.image, self.index, names, self.pooling, -1.0)
        return {**batch, "vectors": [len(vectors)]}


def child(
    subjects: int, shape: tuple[int, int, int], mode: str, address: str | None
) -> dict[str, float]:
    """The measured process: its phases in seconds from its own start."""
    started = time.perf_counter()
    import ray
    from ray.data import ActorPoolStrategy, Dataset

    from cohort.execution.session import ensure_ray

    ensure_ray(address)
    up = time.perf_counter() - started
    items = ray.data.from_items([{"subject": i} for i in range(subjects)])
    ds: Dataset = items.map_batches(
        Extract,
        fn_constructor_kwargs={"shape": shape, "mode": mode},
        batch_size=1,
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    arrivals = [time.perf_counter() - started for _ in ds.iter_rows()]
    ray.shutdown()
    done = time.perf_counter() - started
    return {"ray_up_s": up, "first_s": arrivals[0], "last_s": arrivals[-1], "down_s": done}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=22)
    p.add_argument("--shape", default="96,128,128")
    p.add_argument("--modes", default="masked-pool,masked-input")
    p.add_argument("--loop-s", type=float, help="the plain loop's whole-process seconds")
    p.add_argument("--address", help="join this running Ray (e.g. auto) instead of a private one")
    p.add_argument(_CHILD, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.child:
        phases = child(args.subjects, shape, args.child, args.address)  # type: ignore[arg-type]
        print(json.dumps(phases))
        return
    ray = f"joined Ray at {args.address}" if args.address else "a private Ray per process"
    print(f"{args.subjects} subjects of {args.shape}, one actor, {ray}:")
    for mode in args.modes.split(","):
        command = [sys.executable, "-m", "bench.startup_floor", "--subjects", str(args.subjects)]
        command += ["--shape", args.shape, _CHILD, mode]
        command += ["--address", args.address] if args.address else []
        wall, printed = timed(command)
        phases = json.loads(printed.strip().splitlines()[-1])
        said = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        ratio = f"; at most {args.loop_s / wall:.2f}x the loop" if args.loop_s else ""
        print(f"  {mode:<13} {wall:6.1f} s whole process ({said}){ratio}", flush=True)


if __name__ == "__main__":
    main()
