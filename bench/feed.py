"""The data path alone: cohort's real pipeline with a pass-through network.

::

    python -m bench.feed --data /tmp/feed-data --subjects 8 --cpus 2
    python -m bench.feed --data /tmp/feed-data --subjects 8 --in-process   # no Ray

Runs the pipeline's own stream (:func:`cohort.execution.graph.stream`: Ray
Data, loader tasks, the actor pool, the attempt ledger; or with
``--in-process`` :func:`cohort.execution.inprocess.stream`) on ``--subjects``
full-size subjects (one ``.nii.gz`` pair made by ``python -m bench.loader
--make DIR``, linked under as many subject ids), with the feature actor's
network replaced by a pass-through: each region's vector is the mean of the
model input under it (no convolution), so what is timed is reading, decoding,
placing, handing over, copying to the device and normalising.

Reports subjects per second (whole stream, and from the first result to the
last) against the ideal ``loader cores / t_loader``, where ``t_loader`` is the
loader task timed alone on one subject in this process, just before the
stream (best of ``--repeats``); the actor's time per subject (all of it
overhead here: the network does nothing); the bytes per subject handed from
loader to actor. Writes ``feed.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cohort.config import ExecutionConfig, ModelConfig, RunConfig
from cohort.execution import extract as extract_module
from cohort.execution.extract import FeatureActor, Features, pick_device
from cohort.execution.load import READY, load_subject
from cohort.inputs.handover import hu_of
from cohort.model.pooling import RegionVector

ROOT = Path(__file__).resolve().parents[1]
LABELS = "tibia=1,femur=2"


class PassThroughFeatures(Features):
    """:class:`Features` without a network: a region's vector is the mean of the model
    input under it (the data path is all that is left to time)."""

    def __init__(self, cfg: RunConfig, where: str) -> None:  # no network to build
        self.cfg, self.fault = cfg, None
        self.device = pick_device(cfg.execution.device)
        self.device_name = f"pass-through on {self.device} ({where})"
        if hasattr(extract_module, "DeviceFeed"):  # the code with the compact hand-over
            self.feed = extract_module.DeviceFeed(self.device)
            self._ahead = None

    def _extract(self, subject: Any, origin: str = "", key: str = "") -> list[RegionVector]:
        if hasattr(subject, "image"):  # the pickled float subject of the code before
            image = torch.from_numpy(np.ascontiguousarray(subject.image)).to(self.device)
            index = torch.from_numpy(np.ascontiguousarray(subject.region_index)).to(self.device)
        else:
            image, index, _ = self._inputs(subject, origin, key)
        planes = index if index.ndim == 4 else index[None]
        n = len(subject.region_names)
        sums = torch.zeros(256, dtype=torch.float64, device=image.device)
        flat = image.reshape(-1)
        for plane in planes:  # one pass per plane: the sums of every region in it
            codes = plane.reshape(-1)  # uint8: bincount takes it as it is
            sums += torch.bincount(codes, weights=flat, minlength=256).to(torch.float64)
        counts = np.asarray(subject.voxels, dtype=np.float64)  # counted by the loader
        means = (sums[:n].cpu().numpy() / counts).astype(np.float32)
        return [
            RegionVector(name, "pass", "input", means[r : r + 1])
            for r, name in enumerate(subject.region_names)
        ]


class PassThroughActor(FeatureActor):
    """The feature actor with :class:`PassThroughFeatures`; ledger and all else as is."""

    def __init__(
        self, cfg: RunConfig, threads: int | None, fault: Any = None, ledger: Any = None
    ) -> None:
        self.cfg, self.ledger = cfg, ledger
        if threads is not None:
            torch.set_num_threads(threads)
        self.features = PassThroughFeatures(cfg, "Ray actor")
        self.node = self.arrive(ledger)


def handed_bytes(row: dict[str, Any]) -> tuple[int, tuple[int, int, int]]:
    """Bytes a loader's row hands to the actor (the pickled payload, or the arrays), and
    the model input's shape."""
    if "payload" in row:
        image = pickle.loads(row["payload"]).image
        return len(row["payload"]), tuple(int(n) for n in image.shape)  # type: ignore[return-value]
    hu = hu_of(row)
    shape = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    return int(hu.nbytes + np.asarray(row["planes"]).nbytes), shape


def manifest_rows(data: Path, n: int) -> list[dict[str, Any]]:
    """``n`` subjects, each a link to the one full-size pair (distinct ids, distinct keys)."""
    links = data / "subjects"
    links.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        image, mask = links / f"s{i:03d}_ct.nii.gz", links / f"s{i:03d}_seg.nii.gz"
        for link, target in ((image, data / "ct.nii.gz"), (mask, data / "seg.nii.gz")):
            if not link.exists():
                os.symlink(target, link)
        rows.append(
            {
                "subject_id": f"s{i:03d}",
                "cohort": "all",
                "image": str(image),
                "mask": str(mask),
                "labels": LABELS,
                "series_uid": "",
            }
        )
    return rows


def time_loader(row: dict[str, Any], cfg: RunConfig, repeats: int) -> dict[str, Any]:
    """The loader task alone in this process (one core), best of ``repeats``."""
    walls, cpus, size, shape = [], [], 0, (0, 0, 0)
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = load_subject(dict(row), cfg, "feed", frozenset())
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        if out["status"] != READY:
            raise SystemExit(f"the loader failed: {out['message']}")
        size, shape = handed_bytes(out)
        del out
    return {"wall_s": min(walls), "cpu_s": min(cpus), "handed_bytes": size, "shape": shape}


def run_stream(
    rows: list[dict[str, Any]],
    cfg: RunConfig,
    args: argparse.Namespace,
    shape: tuple[int, int, int],
) -> list[Any]:
    """Results of the pipeline's stream, each with the time it arrived."""
    arrived: list[tuple[float, dict[str, Any]]] = []
    started = time.perf_counter()
    if args.in_process:
        from cohort.execution import inprocess
        from cohort.execution.session import Pool

        inprocess.Features = lambda *a, **k: PassThroughFeatures(cfg, "in-process")  # type: ignore
        pool = Pool(1, 1.0 if cfg.execution.device == "cuda" else 0.0, None)
        for result in inprocess.stream(rows, torch.nn.Identity(), cfg, "feed", frozenset(), pool):
            arrived.append((time.perf_counter() - started, result))
    else:
        import ray

        from cohort.execution import graph
        from cohort.execution.session import ActorMemory, Pool, actor_memory
        from cohort.inputs.headers import InputSizes

        graph.FeatureActor = PassThroughActor  # type: ignore[misc]
        gpus = 1.0 if cfg.execution.device == "cuda" else 0.0
        pool = Pool(1, gpus, None)
        try:  # the loaders' budget as the driver sizes it
            memory = actor_memory(
                InputSizes(1, 1, (shape,)),
                cfg,
                ["features.denseblock4.denselayer16.conv2"],
                pool.device,
                1,
                int(args.cpus / cfg.execution.loader_cpus),
            )
        except TypeError:  # the code before: no loader term
            memory = actor_memory(
                InputSizes(1, 1, (shape,)),
                cfg,
                ["features.denseblock4.denselayer16.conv2"],
                pool.device,
                1,
            )
        memory = ActorMemory(2 * 2**30, memory.queue_bytes, memory.basis)
        ray.init(num_cpus=args.cpus, num_gpus=int(gpus), include_dashboard=False)
        up = time.perf_counter() - started
        started = time.perf_counter()
        try:
            for result in graph.stream(rows, {}, cfg, "feed", frozenset(), pool, memory):
                arrived.append((time.perf_counter() - started, result))
        finally:
            ray.shutdown()
        print(f"ray up in {up:.1f} s; budget {(memory.queue_bytes or 0) / 2**20:.0f} MiB")
    return arrived


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of bench.loader --make")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--in-process", action="store_true", help="without Ray (loader threads)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    args = p.parse_args(argv)
    cfg = RunConfig(
        model=ModelConfig(weights="random"),
        execution=ExecutionConfig(device=args.device, executor="ray", max_retries=0),
    )
    rows = manifest_rows(args.data, args.subjects)
    loader = time_loader(rows[0], cfg, args.repeats)
    results = run_stream(rows, cfg, args, loader["shape"])
    done = [r for _, r in results if r["status"] == "done"]
    if len(done) != len(rows):
        bad = [(r["subject_id"], r["message"]) for _, r in results if r["status"] != "done"]
        raise SystemExit(f"{len(done)} of {len(rows)} subjects done: {bad[:3]}")
    times = [t for t, _ in results]
    actor = [float(r["seconds"]) for _, r in results]
    whole = len(rows) / times[-1]
    steady = (len(rows) - 1) / (times[-1] - times[0]) if len(rows) > 1 else float("nan")
    if args.in_process:
        from cohort.execution.inprocess import LOADER_THREADS

        cores = float(min(LOADER_THREADS, args.cpus))
    else:  # the CPUs the loaders may use beside the actor's share
        cores = args.cpus - cfg.execution.actor_cpus
    ideal = cores / loader["wall_s"]
    report = {
        "subjects": len(rows),
        "executor": "in-process" if args.in_process else "ray",
        "device": args.device,
        "cpus": args.cpus,
        "loader_cores": cores,
        "t_loader_wall_s": loader["wall_s"],
        "t_loader_cpu_s": loader["cpu_s"],
        "handed_bytes_per_subject": loader["handed_bytes"],
        "model_input": "x".join(map(str, loader["shape"])),
        "handed_bytes_per_voxel": loader["handed_bytes"] / math.prod(loader["shape"]),
        "first_result_s": times[0],
        "last_result_s": times[-1],
        "subjects_per_s_whole": whole,
        "subjects_per_s_steady": steady,
        "ideal_subjects_per_s": ideal,
        # what the actor alone allows (its time per subject: here all data path, no model)
        "actor_bound_subjects_per_s": 1.0 / statistics.median(actor),
        "achieved_over_ideal_steady": steady / ideal,
        "achieved_over_ideal_whole": whole / ideal,
        "actor_s_per_subject_median": statistics.median(actor),
        "load": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feed.json").write_text(json.dumps(report, indent=1))
    for key, value in report.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
