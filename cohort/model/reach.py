"""How small an input each hooked layer can take: the least size along D, H and W.

A layer is *reached* by an input when the forward pass gets to it and its
output keeps at least one cell along every axis; below that the network's
strides and pooling leave nothing (torch then stops with "input image ...
smaller than kernel size"). The least size is found by running the network
on the meta device (shapes only: no compute, no memory), one axis at a time
with the other two large, by bisection; a module reached by an input is
reached by every larger one, and each module needs at least what the modules
before it need. The loaders, which do not import torch, get the answer as a
:class:`~cohort.inputs.geometry.Reach` and refuse a volume that is too small
at the check stage, naming the minimum and the fixes.

For DenseNet121 every 3x3x3 convolution of dense block 4 (the default
layers) needs 29 voxels along each axis; dense block 3 needs 13, dense
block 2 needs 5.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from cohort import __version__
from cohort.errors import ModelError
from cohort.inputs.geometry import LayerReach, Reach
from cohort.model.hooks import LayerInfo

__all__ = ["LARGE", "LIMIT", "layer_reach"]

LARGE = 64  # size of the other two axes while one is probed (doubled until it suffices)
LIMIT = 4096  # largest size tried along an axis
_MIN_STAGES = 3  # stages: the shallowest level of the module tree with this many conv holders

Shape = tuple[int, int, int]
_cache: dict[tuple[str, tuple[str, ...]], Reach] = {}


class _StopError(Exception):
    """Raised by the hook of the last module a probe needs: nothing after it runs."""


def layer_reach(network: nn.Module, layers: Sequence[LayerInfo]) -> Reach:
    """The least (D, H, W) input of each hooked layer, and of the network's stages.

    Stages are the modules at the shallowest level of the module tree that
    holds at least three modules with a convolution (DenseNet's
    ``features.denseblockN`` and ``features.transitionN``, ResNet's
    ``layerN``); those that finish before the deepest hooked layer are listed,
    in execution order, so that a message can name a shallower layer that an
    input does reach. The answer depends on the architecture only, and is
    kept per architecture for the life of the process.
    """
    paths = [info.module_path for info in layers]
    key = (repr(network), tuple(f"{info.layer}={info.module_path}" for info in layers))
    if key in _cache:
        return _cache[key]
    saved = _read_saved(key)
    if saved is not None:
        _cache[key] = saved
        return saved
    probe = _meta_copy(network)
    last = max(layers, key=lambda info: info.rank).module_path
    large = LARGE
    order = _finished(probe, [*paths, *_stages(network)], last, (large, large, large))
    while last not in order:
        large *= 2
        if large > LIMIT:
            raise ModelError(
                f"layer {last} is not reached even by a {LIMIT}^3 input on the meta device; "
                "it may not run in the forward pass: hook another layer"
            )
        order = _finished(probe, [*paths, *_stages(network)], last, (large, large, large))
    targets = order[: order.index(last) + 1]  # hooked layers and shallower stages, in order
    least: dict[str, list[int]] = {path: [] for path in targets}
    for axis in range(3):
        seen: dict[int, tuple[str, ...]] = {large: order}  # size along this axis -> reached

        def reached(
            n: int, axis: int = axis, seen: dict[int, tuple[str, ...]] = seen
        ) -> tuple[str, ...]:
            if n not in seen:
                d, h, w = (n if a == axis else large for a in range(3))
                seen[n] = _finished(probe, targets, last, (d, h, w))
            return seen[n]

        floor = 1
        for path in targets:
            hint = least[path][0] if least[path] else None  # the answer along D
            floor = _least(path, reached, seen, floor, hint)
            least[path].append(floor)
    by_path = {path: (least[path][0], least[path][1], least[path][2]) for path in targets}
    stages = tuple(
        LayerReach(path, path, by_path[path]) for path in targets if path not in set(paths)
    )
    reach = Reach(
        layers=tuple(LayerReach(i.layer, i.module_path, by_path[i.module_path]) for i in layers),
        stages=stages,
    )
    _cache[key] = reach
    _save(key, reach)
    return reach


# The answer is also kept on disk, per architecture, layers and cohort version: a run's
# driver then skips the ~2 s of probes that DenseNet121's default layers cost (the probes
# are what decides; the file only remembers their answer).
REACH_FORMAT = 1


def _saved_path(key: tuple[str, tuple[str, ...]]) -> Path:
    digest = hashlib.sha256(
        repr((REACH_FORMAT, __version__, torch.__version__, key)).encode()
    ).hexdigest()[:32]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "cohort" / "reach" / f"{digest}.json"


def _read_saved(key: tuple[str, tuple[str, ...]]) -> Reach | None:
    try:
        data = json.loads(_saved_path(key).read_text())
        return Reach(
            layers=tuple(LayerReach(a, b, (c[0], c[1], c[2])) for a, b, c in data["layers"]),
            stages=tuple(LayerReach(a, b, (c[0], c[1], c[2])) for a, b, c in data["stages"]),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _save(key: tuple[str, tuple[str, ...]], reach: Reach) -> None:
    path = _saved_path(key)
    data = {
        kind: [[r.layer, r.module_path, list(r.min_shape)] for r in rows]
        for kind, rows in (("layers", reach.layers), ("stages", reach.stages))
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the probes run again next time


def _least(
    path: str,
    reached: Callable[[int], tuple[str, ...]],
    seen: dict[int, tuple[str, ...]],
    floor: int,
    hint: int | None,
) -> int:
    """The least size n >= ``floor`` that reaches ``path``, by bisection between the
    sizes already probed; ``hint`` (the answer along another axis) is tried first."""
    if (
        hint is not None
        and hint >= floor
        and path in reached(hint)
        and (hint == floor or path not in reached(hint - 1))
    ):
        return hint
    low = max([floor - 1, *(n for n, done in seen.items() if path not in done)])
    high = min(n for n, done in seen.items() if path in done)
    while high - low > 1:  # path not reached at low, reached at high
        middle = low + 1 if low + 1 == floor else (low + high) // 2
        if path in reached(middle):
            high = middle
        else:
            low = middle
    return high


def _finished(probe: nn.Module, targets: Sequence[str], last: str, shape: Shape) -> tuple[str, ...]:
    """The ``targets`` an input of ``shape`` reaches, in the order they finish; the pass
    stops after ``last`` or where the input is too small."""
    done: list[str] = []

    def record(path: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if (
                isinstance(output, torch.Tensor)
                and output.dim() == 5
                and min(output.shape[2:]) >= 1
                and path not in done
            ):
                done.append(path)
            if path == last:
                raise _StopError

        return hook

    handles = [probe.get_submodule(path).register_forward_hook(record(path)) for path in targets]
    try:
        with torch.no_grad():
            probe(torch.empty((1, 1, *shape), device="meta"))
    except _StopError:
        pass
    except (RuntimeError, ValueError, IndexError):  # too small: torch stops at some module
        pass
    finally:
        for handle in handles:
            handle.remove()
    return tuple(done)


def _meta_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` on the meta device, without copying its weights."""
    memo: dict[int, object] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for p in network.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in network.buffers()})
    probe = copy.deepcopy(network, memo).to("meta")
    for module in probe.modules():  # hooks copied from the original must not fire here
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return probe.eval()


def _stages(network: nn.Module) -> list[str]:
    """Module paths of the network's stages (see :func:`layer_reach`)."""
    holders = [
        path
        for path, module in network.named_modules()
        if path and any(isinstance(m, nn.Conv3d) for m in module.modules())
    ]
    for depth in itertools.count(1):
        level = [path for path in holders if path.count(".") == depth - 1]
        if not level:
            return []
        if len(level) >= _MIN_STAGES:
            return level
    return []
