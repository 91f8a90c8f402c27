"""Peak tensor memory of the forward pass per input voxel, by stage: plain vs lean.

    python -m bench.memory --shape 512,512,216 [--shape 512,512,648] [--repeats 1]

``--shape X,Y,Z`` is a CT of Z slices of X x Y voxels; the model input is
(1, 1, Z, Y, X) (depth first). The network is cohort's DenseNet121 (seeded
random weights: memory and time do not depend on the values), hooked at
``conv-1,conv-3,conv-5``; the pass is :func:`cohort.model.pooling.extract`
with ``masked-pool`` and three regions, as the feature actor runs it.
``plain`` is the code before issue 15: the plain forward pass and the region
weights from one-hot masks; ``lean`` the default now.

Memory is the allocator's own account, not the process's RSS: on the CPU the
torch profiler (``profile_memory=True``) records every allocation and free of
tensor memory with its size; summing them in time order gives the bytes live
at each moment, relative to the start of the call (so the input volume and
the weights, allocated before, are not counted). On CUDA the same events come
from the caching allocator, and the total is checked against
``torch.cuda.max_memory_allocated``. Each stage's figure is the most bytes
live while that stage ran (the stage being the top-level module whose
submodule ran last: ``stem``, ``denseblock1``, ``transition1``, ...; the
lean pass interleaves the streamed stages chunk by chunk), divided by the
number of input voxels.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from cohort.config import PoolingConfig
from cohort.model import pooling
from cohort.model.hooks import FeatureExtractor, Grid, resolve_layers
from cohort.model.lean import DEFAULT_CHUNK_VOXELS, PROFILE_LABEL
from cohort.model.network import build_network, random_weights
from cohort.model.pooling import extract

LAYERS = ("conv-1", "conv-3", "conv-5")
REGIONS = ("tibia", "femur", "background")
_MARK = "stage:"
_STEM = {"conv0", "norm0", "relu0", "pool0", "conv1", "bn1", "relu", "maxpool"}


def stage_of(path: str) -> str:
    """The bench's stage of a module path: ``stem``, ``denseblock2``, ``layer3``, ..."""
    parts = path.split(".")
    if parts[0] == "features" and len(parts) > 1:
        parts = parts[1:]
    return "stem" if parts[0] in _STEM else parts[0]


@dataclass
class Peaks:
    """Most bytes live during a call, relative to its start, overall and per stage."""

    total: int = 0
    stages: dict[str, int] = field(default_factory=dict)  # in the order they first ran


def _allocations(prof: profile, device: torch.device) -> list[tuple[int, int, str | None]]:
    """(time ns, +bytes allocated / -bytes freed, stage marker name) events in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int, str | None]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == device.type:
                events.append((node.start_time_ns, int(fields.alloc_size), None))
        elif node.name.startswith(_MARK):
            events.append((node.start_time_ns, 0, node.name[len(_MARK) :]))
        elif node.name.startswith(PROFILE_LABEL):  # the lean pass names the op it runs
            events.append((node.start_time_ns, 0, stage_of(node.name[len(PROFILE_LABEL) :])))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    return events


def peaks_of(events: Sequence[tuple[int, int, str | None]]) -> Peaks:
    """Running sum of allocation events; the max overall and within each stage."""
    out = Peaks()
    live, stage = 0, "start"
    out.stages[stage] = 0
    for _, size, marker in events:
        if marker is not None:
            stage = marker
            out.stages[stage] = max(out.stages.get(stage, 0), live)
            continue
        live += size
        out.total = max(out.total, live)
        out.stages[stage] = max(out.stages[stage], live)
    if out.stages.get("start") == 0:
        del out.stages["start"]
    return out


@contextmanager
def stage_markers(network: nn.Module) -> Iterator[None]:
    """Mark in the profile each time a module of another stage starts running."""
    current = [""]

    def pre_hook(path: str) -> Callable[[nn.Module, object], None]:
        stage = stage_of(path)

        def hook(_module: nn.Module, _inputs: object) -> None:
            if stage != current[0]:
                current[0] = stage
                mark(stage)

        return hook

    handles = [
        module.register_forward_pre_hook(pre_hook(path))
        for path, module in network.named_modules()
        if path and path != "features"  # the trunk's container is no stage
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mark(stage: str) -> None:
    """A zero-length marker event in the profile: from here on, allocations are ``stage``'s."""
    with record_function(_MARK + stage):
        pass


def measure(fn: Callable[[], object], device: torch.device) -> Peaks:
    """Peak bytes live during ``fn()`` (relative to its start), overall and by stage."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    peaks = peaks_of(_allocations(prof, device))
    if device.type == "cuda":
        peaks.total = max(peaks.total, torch.cuda.max_memory_allocated(device) - before)
    return peaks


def peak_bytes(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Most bytes of tensor memory live during ``fn()``, relative to its start.

    CUDA: the caching allocator's statistics. CPU: the profiler's allocation events.
    """
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return measure(fn, device).total


def one_hot_weights(region_index: torch.Tensor, n_regions: int, grid: Grid) -> torch.Tensor:
    """``region_weights`` before issue 15: (R, D, H, W) one-hot masks, then pooled."""
    ids = torch.arange(n_regions, device=region_index.device).view(n_regions, 1, 1, 1)
    one_hot = (region_index.unsqueeze(0) == ids).to(torch.float32)
    return F.adaptive_avg_pool3d(one_hot.unsqueeze(0), grid)[0]


@contextmanager
def plain_weights(plain: bool) -> Iterator[None]:
    """Within: :func:`cohort.model.pooling.extract` pools with :func:`one_hot_weights`."""
    lean = pooling.region_weights
    if plain:
        pooling.region_weights = one_hot_weights
    try:
        yield
    finally:
        pooling.region_weights = lean


def _volume(shape_xyz: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    x, y, z = shape_xyz
    gen = torch.Generator().manual_seed(0)
    image = torch.randn((z, y, x), generator=gen).to(device)
    index = torch.full((z, y, x), 2, dtype=torch.uint8)
    index[z // 8 : z // 2, y // 4 : 3 * y // 4, x // 4 : x // 2] = 0
    index[z // 2 : 7 * z // 8, y // 4 : 3 * y // 4, x // 2 : 3 * x // 4] = 1
    return image, index.to(device)


@dataclass(frozen=True)
class Row:
    shape: str
    variant: str
    voxels: int
    seconds: list[float]
    total: float  # bytes per input voxel
    stages: dict[str, float]  # bytes per input voxel


def run(
    shape_xyz: tuple[int, int, int],
    variants: Sequence[str],
    device: torch.device,
    repeats: int,
    chunk_voxels: int,
) -> list[Row]:
    network, _ = build_network("densenet121", random_weights("densenet121", 0).state_dict)
    network = network.to(device)
    image, index = _volume(shape_xyz, device)
    voxels = image.numel()
    layers = resolve_layers(network, LAYERS, tuple(image.shape))  # type: ignore[arg-type]
    rows: list[Row] = []
    for variant in variants:
        ex = FeatureExtractor(network, layers, lean=variant == "lean", chunk_voxels=chunk_voxels)
        ex.register_forward_hook(lambda *_: mark("pooling"))

        def call(ex: FeatureExtractor = ex, plain: bool = variant == "plain") -> object:
            with plain_weights(plain):
                return extract(ex, image, index, REGIONS, PoolingConfig(), air=-1.0)

        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
        with stage_markers(network):
            peaks = measure(call, device)
        rows.append(
            Row(
                "x".join(map(str, shape_xyz)),
                variant,
                voxels,
                seconds,
                peaks.total / voxels,
                {name: b / voxels for name, b in peaks.stages.items()},
            )
        )
        print(table(rows[-1:]), flush=True)
    return rows


def table(rows: Sequence[Row]) -> str:
    stages: list[str] = []
    for row in rows:
        stages.extend(s for s in row.stages if s not in stages)
    head = ["shape", "forward", "s (min)", "peak B/voxel", *stages]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row.shape,
            row.variant,
            f"{min(row.seconds):.1f}" if row.seconds else "-",
            f"**{row.total:.1f}**",
            *(f"{row.stages[s]:.1f}" if s in row.stages else "" for s in stages),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=_shape, action="append", help="X,Y,Z (repeatable)")
    p.add_argument("--variants", default="plain,lean", help="plain,lean")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per variant (unprofiled)")
    p.add_argument("--chunk-voxels", type=int, default=DEFAULT_CHUNK_VOXELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    shapes = args.shape or [(512, 512, 216)]
    device = torch.device(args.device)
    rows: list[Row] = []
    for shape in shapes:
        rows.extend(run(shape, args.variants.split(","), device, args.repeats, args.chunk_voxels))
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
