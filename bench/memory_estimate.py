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
  the hand-over (int16 HU and the uint8 region index, as the object store
  gives them), makes the float32 input of it and runs the call
  (:class:`cohort.execution.extract.Features` on the CPU). The peak resident
  memory (``VmHWM``, reset before the subject) less the resident memory
  before the hand-over existed is compared with the estimate's hand-over,
  input, preparation and forward parts (``Estimate.host`` less the weights,
  which the process held already). Unlike the profiler this sees numpy's arrays and what the C
  allocator keeps. Measured where the hand-over and the input reach
  :data:`WORKER_MIN_BYTES`: below that the subject reuses heap pages the
  warm-up run left, and resident memory says little.

``--out FILE`` writes the table as a Markdown section (for ``bench/SCALING.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bench.memory import REGIONS, _volume, measure, stage_markers
from cohort.config import DEFAULT_LAYERS, PoolingConfig, PoolingMode, Precision
from cohort.inputs.preprocess import Placed
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
    """In this (fresh) process: the feature actor's work on one subject (its
    :class:`~cohort.execution.extract.Features` on the CPU); resident bytes."""
    from cohort.config import ExecutionConfig, ModelConfig, RunConfig
    from cohort.execution.extract import Features

    network, _ = build_network(backbone, random_weights(backbone, 0).state_dict)
    cfg = RunConfig(
        model=ModelConfig(backbone=backbone),
        execution=ExecutionConfig(device="cpu"),
        pooling=PoolingConfig(mode=pooling),
    )
    features = Features(network, cfg, None, "bench")
    features._extract(_handed((32, 64, 64)), "warm-up")  # oneDNN's one-time set-up
    gc.collect()
    before = _rss()
    placed = _handed(shape)  # what the object store hands over: int16 HU, uint8 regions
    with_payload = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    features._extract(placed, "bench")
    return {"before": before, "with_payload": with_payload, "peak": _rss("VmHWM")}


def _handed(shape: Shape) -> Placed:
    """A loader's hand-over of a ``shape`` subject: int16 HU (every page written) and
    the uint8 region index of three box regions."""
    d, h, w = shape
    _, index = _volume((w, h, d), torch.device("cpu"))
    hu = np.empty(shape, dtype=np.int16)
    hu[...] = np.arange(w, dtype=np.int16) % 2000 - 1000
    return Placed(
        hu=hu,
        region_index=index.numpy(),
        region_names=REGIONS,
        voxels=(1, 1, 1),
        spacing_mm=(1.0, 1.0, 1.0),
        original_orientation="RAS",
    )


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
        big = est.inputs + est.image >= WORKER_MIN_BYTES and device.type == "cpu"
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


# the actor making its input: (stored window D,H,W or None, model input D,H,W, normalise)
PREPARE: tuple[tuple[Shape | None, Shape, str], ...] = (
    (None, (216, 512, 512), "fixed"),
    (None, (216, 512, 512), "foreground"),
    ((216, 512, 512), (216, 256, 256), "fixed"),  # 0.35 mm in-plane to 0.7 mm
    ((216, 512, 512), (108, 180, 180), "foreground"),  # to 1 x 1 x 1 mm from 0.5 x 0.35 mm
    ((216, 512, 512), (324, 512, 512), "fixed"),  # 1.5 mm slices to 1 mm
)


def prepare_rows(cases: Sequence[tuple[Shape | None, Shape, str]]) -> str:
    """The actor making its float32 input from a full-size hand-over (resampling with
    ``--spacing``, window, normalisation: ``Features._inputs`` on the CPU), its tensor
    memory from the torch profiler against ``Estimate.prepare``, as a Markdown table."""
    from bench.memory import peak_bytes
    from cohort.config import ExecutionConfig, PreprocessConfig, RunConfig
    from cohort.execution.extract import Features
    from cohort.inputs.preprocess import Deferred

    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    features = Features(network, RunConfig(execution=ExecutionConfig(device="cpu")), None, "b")
    lines = [
        "| handed over D x H x W | model input | normalise | estimate | measured | ratio "
        "| B per model voxel | input and forward pass |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for window, shape, normalise in cases:
        placed = _handed(window or shape)
        if window is not None:
            ratio = (window[0] / shape[0], window[1] / shape[1], window[2] / shape[2])
            deferred = Deferred(ratio, (0, 0, 0), shape, (0, 0, 0), window, (1,))
            placed = dataclasses.replace(
                placed, region_index=np.zeros(shape, np.uint8), deferred=deferred
            )
        features.cfg = RunConfig(
            execution=ExecutionConfig(device="cpu"),
            preprocess=PreprocessConfig(normalise=normalise, foreground_hu=-1000.0),  # type: ignore[arg-type]
        )
        measured = peak_bytes(functools.partial(features._inputs, placed, "bench"))
        est = estimate_peak_bytes(
            shape, "densenet121", DEFAULT_LAYERS, window=window, foreground=normalise != "fixed"
        )
        dims = "x".join(map(str, window or shape))
        lines.append(
            f"| {dims} | {'x'.join(map(str, shape))} | {normalise} | {_mib(est.prepare)} "
            f"| {_mib(measured)} | {est.prepare / measured:.2f} "
            f"| {measured / math.prod(shape):.1f} | {_mib(est.image + est.forward)} |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


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
actor work (holding the hand-over of int16 HU and uint8 regions, making the
float32 input, the call): peak resident memory less what it held before the
hand-over; estimated as the hand-over and the input ({inputs} B/voxel) plus
the forward part; measured where those reach 64 MiB (below, the subject reuses
heap pages of the process's warm-up run). *the check's total*: what the check
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
    p.add_argument("--prepare", action="store_true", help="the actor making its input")
    p.add_argument("--out", help="write the Markdown section here")
    args = p.parse_args(argv)
    if args.calibrate:
        calibrate(args.shape or CALIBRATION, sorted(PROFILES))
        return 0
    if args.prepare:
        print(prepare_rows(PREPARE))
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
            inputs=3 + 4,  # int16 HU and one plane handed over, the float32 input
        )
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
