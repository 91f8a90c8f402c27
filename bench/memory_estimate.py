"""The memory estimate (:mod:`cohort.model.memory`) against the measured peak, by shape.

    python -m bench.memory_estimate                       # default shapes, densenet121
    python -m bench.memory_estimate --shape 512,512,216 --shape 512,512,648 --worker
    python -m bench.memory_estimate --calibrate           # every backbone, per stage

``--shape X,Y,Z`` is a CT of Z slices of X x Y voxels; the model input is
(D, H, W) = (Z, Y, X). The network is ``--backbone`` with seeded random
weights (memory does not depend on the values), hooked at conv-1/3/5; the call
is :func:`cohort.model.pooling.extract` with three regions, as the feature
actor runs it.

Two measurements per shape:

- **forward**: the most tensor memory live during the call, relative to its
  start, from the torch profiler's allocation events (the method of
  :mod:`bench.memory`; on CUDA the caching allocator's peak). This is what the
  estimate's calibrated part (``Estimate.forward``) predicts.
- **worker** (``--worker``): a fresh process builds the network, runs a small
  volume once, then does what the feature actor does with one subject: holds
  the pickled payload, unpickles it and runs the call. The peak resident
  memory (``VmHWM``, reset before the subject) less the resident memory
  before the payload existed is compared with the estimate's payload, input
  and forward parts (``Estimate.host`` less the weights, which the process
  held already). Unlike the profiler this sees numpy's arrays and what the C
  allocator keeps. Measured where the input copies reach
  :data:`WORKER_MIN_BYTES`: below that the subject reuses heap pages the
  warm-up run left, and resident memory says little.

``--out FILE`` writes the table as a Markdown section (for ``bench/SCALING.md``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bench.memory import REGIONS, _volume, measure, stage_markers
from cohort.config import DEFAULT_LAYERS, PoolingConfig, PoolingMode, Precision
from cohort.inputs.preprocess import Prepared
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.lean import DEFAULT_CHUNK_VOXELS
from cohort.model.memory import (
    GIB,
    PROFILES,
    WORKER_BASE_BYTES,
    Estimate,
    estimate_peak_bytes,
)
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import extract

Shape = tuple[int, int, int]  # (D, H, W)
SMALL: tuple[Shape, ...] = ((64, 64, 64), (48, 96, 80), (96, 128, 128))
FULL: tuple[Shape, ...] = ((216, 512, 512), (648, 512, 512))
CALIBRATION: tuple[Shape, ...] = ((96, 128, 128), (128, 192, 192))
WORKER_MIN_BYTES = 64 * 2**20


def extractor(backbone: str, chunk_voxels: int = DEFAULT_CHUNK_VOXELS) -> FeatureExtractor:
    """``backbone`` with seeded random weights, hooked at conv-1/3/5, as an actor builds it."""
    network, _ = build_network(backbone, random_weights(backbone, 0).state_dict)
    network.eval()
    return FeatureExtractor(
        network, resolve_layers(network, DEFAULT_LAYERS), chunk_voxels=chunk_voxels
    )


def call(
    ex: FeatureExtractor,
    shape: Shape,
    pooling: PoolingMode,
    device: torch.device,
    precision: Precision = "fp32",
) -> Callable[[], object]:
    """The actor's call on a random ``shape`` volume with three box regions."""
    d, h, w = shape
    image, index = _volume((w, h, d), device)
    cfg = PoolingConfig(mode=pooling)
    bf16 = precision == "bf16"

    def run() -> object:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return extract(ex, image, index, REGIONS, cfg, air=-1.0)

    return run


def measured_forward(
    ex: FeatureExtractor,
    shape: Shape,
    pooling: PoolingMode = "masked-pool",
    device: torch.device | None = None,
    precision: Precision = "fp32",
) -> tuple[int, dict[str, int]]:
    """Peak tensor bytes of the actor's call (relative to its start), and per stage."""
    device = device or torch.device("cpu")
    with stage_markers(ex.network):
        peaks = measure(call(ex, shape, pooling, device, precision), device)
    return peaks.total, peaks.stages


# ------------------------------------------------------------- the whole worker


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker_child(backbone: str, shape: Shape, pooling: PoolingMode) -> dict[str, int]:
    """In this (fresh) process: the actor's work on one subject; resident bytes."""
    ex = extractor(backbone)
    call(ex, (32, 64, 64), pooling, torch.device("cpu"))()  # oneDNN's one-time set-up
    gc.collect()
    before = _rss()
    d, h, w = shape
    image, index = _volume((w, h, d), torch.device("cpu"))
    prepared = Prepared(
        image=image.numpy(),
        region_index=index.numpy(),
        region_names=REGIONS,
        voxels=(1, 1, 1),
        spacing_mm=(1.0, 1.0, 1.0),
        original_orientation="RAS",
        air=-1.0,
    )
    payload = pickle.dumps(prepared, protocol=5)
    del prepared, image, index
    gc.collect()
    with_payload = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    got = pickle.loads(payload)
    image_t = torch.from_numpy(np.ascontiguousarray(got.image))
    index_t = torch.from_numpy(np.ascontiguousarray(got.region_index))
    extract(ex, image_t, index_t, got.region_names, PoolingConfig(mode=pooling), got.air)
    return {"before": before, "with_payload": with_payload, "peak": _rss("VmHWM")}


def measured_worker(backbone: str, shape: Shape, pooling: PoolingMode) -> int:
    """Peak resident bytes of a fresh process doing one subject's actor work, less what
    it held before the payload (the process and the network)."""
    code = (
        "import json, sys; from bench.memory_estimate import worker_child; "
        f"print('WORKER', json.dumps(worker_child({backbone!r}, {shape!r}, {pooling!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=3600
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("WORKER "))
    rss = json.loads(line.removeprefix("WORKER "))
    return int(rss["peak"] - rss["before"])


# ------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    backbone: str
    pooling: str
    shape: Shape
    estimate: Estimate
    forward: int  # measured, bytes
    seconds: float
    worker: int | None = None  # measured, bytes

    @property
    def worker_estimate(self) -> int:
        return self.estimate.host - (self.estimate.weights if self.estimate.device == "cpu" else 0)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| backbone | pooling | CT (x, y, slices) | model input D x H x W | B/voxel measured "
        "| forward: estimate | measured | ratio | worker: estimate | measured | ratio "
        "| the check's total |"
    )
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d, h, w = r.shape
        est = r.estimate
        worker = ("-", "-", "-")
        if r.worker is not None:
            ratio = r.worker_estimate / r.worker
            worker = (_mib(r.worker_estimate), _mib(r.worker), f"{ratio:.2f}")
        total = (est.host + WORKER_BASE_BYTES) / GIB
        lines.append(
            f"| {r.backbone} | {r.pooling} | {w}x{h}x{d} | {d}x{h}x{w} "
            f"| {r.forward / math.prod(r.shape):.1f} | {_mib(est.forward)} | {_mib(r.forward)} "
            f"| **{est.forward / r.forward:.2f}** | {' | '.join(worker)} | {total:.2f} GB |"
        )
    return "\n".join(lines)


def run(
    backbone: str,
    shapes: Sequence[Shape],
    pooling: PoolingMode,
    device: torch.device,
    worker: bool,
    precision: Precision = "fp32",
) -> list[Row]:
    ex = extractor(backbone).to(device)
    rows = []
    for shape in shapes:
        started = time.perf_counter()
        forward, _ = measured_forward(ex, shape, pooling, device, precision)
        seconds = time.perf_counter() - started
        layers = [info.module_path for info in ex.layers]
        est = estimate_peak_bytes(shape, backbone, layers, pooling, precision, device.type)
        # the worker's resident memory is the CPU's: measured for CPU runs only
        big = 2 * est.inputs >= WORKER_MIN_BYTES and device.type == "cpu"
        measured = measured_worker(backbone, shape, pooling) if worker and big else None
        rows.append(Row(backbone, pooling, shape, est, forward, seconds, measured))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def calibrate(shapes: Sequence[Shape], backbones: Sequence[str]) -> None:
    """Every backbone's peak per stage, bytes per input voxel (the figures of
    :data:`cohort.model.memory.PROFILES`), and the network's bytes."""
    for backbone in backbones:
        ex = extractor(backbone)
        weights = sum(t.numel() * t.element_size() for t in ex.network.state_dict().values())
        print(f"{backbone}: weights {weights:,} bytes")
        for shape in shapes:
            total, stages = measured_forward(ex, shape)
            voxels = math.prod(shape)
            per_stage = ", ".join(f"{s} {b / voxels:.2f}" for s, b in stages.items() if s)
            print(f"  {shape}: peak {total / voxels:.2f} B/voxel; {per_stage}", flush=True)


def _shape(text: str) -> Shape:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    x, y, z = parts
    return z, y, x


SECTION = """## Memory estimate (issue 16)

Each subject's peak memory in its feature actor is estimated from its model
input's shape (`cohort/model/memory.py`) and checked at the `check` stage
against `--actor-memory` less {base:.1f} GB for the worker process. Measured
here against the estimate ({when}; `{command}`):

{table}

*forward*: the tensor memory of the actor's call (forward pass to conv-1/3/5
and pooling, three regions, fp32, CPU, seeded random weights) from the torch
profiler's allocation events, relative to the start of the call; the
estimate's calibrated part. *worker*: a fresh process doing one subject's
actor work (holding the pickled payload, unpickling it, the call): peak
resident memory less what it held before the payload; estimated as the
payload and the unpickled input ({inputs} B/voxel) plus the forward part;
measured where the input copies reach 64 MiB (below, the subject reuses heap
pages of the process's warm-up run). *the check's total*: what the check
compares with `--actor-memory` (worker estimate + weights + {base:.1f} GB for
the process).
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_estimate", description=__doc__)
    p.add_argument("--shape", type=_shape, action="append", help="X,Y,Z (repeatable)")
    p.add_argument("--backbone", default="densenet121", help="one or more, comma-separated")
    p.add_argument("--pooling", default="masked-pool")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: CUDA")
    p.add_argument("--worker", action="store_true", help="also the whole worker's peak RSS")
    p.add_argument("--calibrate", action="store_true", help="every backbone, per stage")
    p.add_argument("--out", help="write the Markdown section here")
    args = p.parse_args(argv)
    if args.calibrate:
        calibrate(args.shape or CALIBRATION, sorted(PROFILES))
        return 0
    shapes = args.shape or [*SMALL, *FULL]
    device = torch.device(args.device)
    rows = []
    for backbone in args.backbone.split(","):
        if backbone not in PROFILES:
            p.error(f"--backbone: choose from {', '.join(PROFILES)}")
        rows.extend(run(backbone, shapes, args.pooling, device, args.worker, args.precision))
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(table(rows))
    if args.out:
        command = "python -m bench.memory_estimate " + " ".join(argv or sys.argv[1:])
        text = SECTION.format(
            base=WORKER_BASE_BYTES / GIB,
            when=time.strftime("%Y-%m-%d %H:%M") + f", torch {torch.__version__}, {device}",
            command=command.strip(),
            table=table(rows),
            inputs=2 * 5,
        )
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
