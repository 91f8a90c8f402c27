"""Choosing layers to hook, and running the network only as far as needed.

Layer specs are either ``conv-K`` (the K-th convolution from the end, counted
in execution order, which a dry run on the meta device establishes; module
registration order can differ from it) or a module path such as
``features.denseblock4``.

For the inflated DenseNet121 the defaults are::

    conv-1  features.denseblock4.denselayer16.conv2   32 channels
    conv-3  features.denseblock4.denselayer15.conv2   32 channels
    conv-5  features.denseblock4.denselayer14.conv2   32 channels

Each is the raw output of a dense layer's 3x3x3 convolution: before the next
BatchNorm and ReLU, and before it is concatenated with the block's earlier
features. (conv-2, conv-4 are the 1x1x1 bottleneck convolutions in between.)

:class:`FeatureExtractor` runs the network through :func:`run_hooked` by
default, the lean pass: plain ``nn.Sequential`` containers dissolve into their
children (*ops*); the first ops, until the depth stride reaches 8 (DenseNet121:
the stem, dense block 1 and transition 1), run as one depth pipeline
(:class:`~cohort.model.lean.WindowStage`, :class:`~cohort.model.lean.DenseBlockStage`);
each later dense block fills one buffer in one push; later runs of ops without
halo (a transition) are streamed again; anything else runs as the plain
module. Hooked maps of streamed ops (and of dense layers' conv2) are assembled
from their chunks; a hook the stream cannot serve (a BatchNorm inside a streamed
dense block, say) leaves its op to the later, full-size steps.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.hooks import RemovableHandle

from cohort.errors import ModelError
from cohort.model.lean import (
    DEFAULT_CHUNK_VOXELS,
    DEFAULT_STREAM_UNTIL,
    PROFILE_LABEL,
    DenseBlockStage,
    DenseSpec,
    Sink,
    Window,
    WindowStage,
    compose,
    dense_spec,
    depth_chain,
    is_plain_sequential,
    out_length,
)

Grid = tuple[int, int, int]
_CONV_SPEC = re.compile(r"^conv-(\d+)$")


@dataclass(frozen=True)
class LayerInfo:
    """One hooked layer."""

    layer: str  # the stable id: the spec as given, e.g. "conv-1" or a module path
    module_path: str  # e.g. "features.denseblock4.denselayer16.conv2"
    channels: int  # channels of its output
    grid: Grid  # output (d, h, w) for the probed input size
    rank: int  # position among all modules in order of finishing their forward


@dataclass(frozen=True)
class Traced:
    path: str
    module: nn.Module
    shape: tuple[int, ...] | None  # output shape, None when the output is not a tensor


def trace(network: nn.Module, input_shape: Grid, in_channels: int = 1) -> list[Traced]:
    """Run ``network`` once on the meta device and list modules as they finish.

    Meta tensors carry shapes only, so this costs no compute and no memory.
    """
    probe = copy.deepcopy(network).to("meta")
    for module in probe.modules():  # hooks copied from the original must not fire here
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    finished: list[Traced] = []
    seen: set[str] = set()
    handles: list[RemovableHandle] = []
    originals = dict(network.named_modules())

    def record(path: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if path in seen:
                return
            seen.add(path)
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            finished.append(Traced(path, originals[path], shape))

        return hook

    for path, module in probe.named_modules():
        if path:
            handles.append(module.register_forward_hook(record(path)))
    try:
        with torch.no_grad():
            probe(torch.empty((1, in_channels, *input_shape), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return finished


def conv_paths(traced: Sequence[Traced]) -> list[str]:
    """Module paths of the 3D convolutions in execution order."""
    return [t.path for t in traced if isinstance(t.module, nn.Conv3d)]


def resolve_layers(
    network: nn.Module,
    specs: Sequence[str],
    input_shape: Grid = (64, 64, 64),
    in_channels: int = 1,
) -> tuple[LayerInfo, ...]:
    """Resolve layer specs to hooked layers, reporting channels and output grid."""
    traced = trace(network, input_shape, in_channels)
    by_path = {t.path: (rank, t) for rank, t in enumerate(traced)}
    convs = conv_paths(traced)
    infos: list[LayerInfo] = []
    for spec in specs:
        match = _CONV_SPEC.match(spec)
        if match:
            k = int(match.group(1))
            if not 1 <= k <= len(convs):
                raise ModelError(
                    f"layer {spec!r} is out of range: this network runs {len(convs)} "
                    f"convolutions, so conv-K needs 1 <= K <= {len(convs)} "
                    "(conv-1 is the last)"
                )
            path = convs[-k]
        else:
            path = spec
            if path not in by_path:
                known = dict(network.named_modules())
                why = "is not run by the forward pass" if path in known else "does not exist"
                raise ModelError(
                    f"layer {spec!r} {why}; give conv-K or a module path such as {convs[-1]!r}"
                )
        rank, t = by_path[path]
        if t.shape is None or len(t.shape) != 5:
            raise ModelError(
                f"layer {spec!r} ({path}) does not output a (N, C, D, H, W) tensor; "
                "hook a convolution or a block instead"
            )
        twin = next((i for i in infos if i.module_path == path), None)
        if twin is not None:
            raise ModelError(f"layers {twin.layer!r} and {spec!r} are the same module {path!r}")
        infos.append(LayerInfo(spec, path, t.shape[1], (t.shape[2], t.shape[3], t.shape[4]), rank))
    return tuple(infos)


class _LastHookReachedError(Exception):
    """Raised by the last hook: everything after the last hooked layer is skipped."""


class FeatureExtractor(nn.Module):
    """Runs a network up to its last hooked layer and returns the hooked maps.

    ``forward(x)`` returns ``{layer id: (N, C, d, h, w) tensor}``. With
    ``stop_early`` (the default) the forward pass ends as soon as the last
    hooked layer has produced its output; nothing after it is computed.

    With ``lean`` (the default) the pass runs through
    :func:`cohort.model.lean.run_hooked`: the first layers stream over depth
    chunks of ``chunk_voxels`` input voxels and dense blocks fill one buffer
    each, so the peak memory grows by a few bytes per input voxel instead of
    about 70, with the same values. ``lean=False`` is the plain forward pass
    with forward hooks.
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[LayerInfo],
        *,
        stop_early: bool = True,
        lean: bool = True,
        chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
        stream_until: int = DEFAULT_STREAM_UNTIL,
    ) -> None:
        super().__init__()
        if not layers:
            raise ModelError("no layers to hook")
        self.network = network
        self.layers = tuple(layers)
        self.stop_early = stop_early
        self.lean = lean
        self.chunk_voxels = chunk_voxels
        self.stream_until = stream_until
        self._last = max(self.layers, key=lambda info: info.rank).module_path
        self._captured: dict[str, torch.Tensor] = {}
        for info in self.layers:
            network.get_submodule(info.module_path)  # fails early on a wrong path

    def _capture(self, info: LayerInfo) -> Callable[[torch.Tensor], None]:
        def capture(output: torch.Tensor) -> None:
            if info.layer not in self._captured:
                self._captured[info.layer] = output
            if self.stop_early and info.module_path == self._last:
                raise _LastHookReachedError

        return capture

    def _hook(self, info: LayerInfo) -> Callable[[nn.Module, object, torch.Tensor], None]:
        capture = self._capture(info)

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            capture(output)

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        try:
            if self.lean:
                run_hooked(
                    self.network,
                    x,
                    {info.module_path: self._capture(info) for info in self.layers},
                    stop_after=self._last if self.stop_early else None,
                    chunk_voxels=self.chunk_voxels,
                    stream_until=self.stream_until,
                )
            else:
                self._plain(x)
        except _LastHookReachedError:
            pass
        captured, self._captured = self._captured, {}
        missing = [info.layer for info in self.layers if info.layer not in captured]
        if missing:
            raise ModelError(f"hooked layers {missing} did not run for input {tuple(x.shape)}")
        return {info.layer: captured[info.layer] for info in self.layers}

    def _plain(self, x: torch.Tensor) -> None:
        # Hooks live only for this call, so the network is left as it was found.
        handles = [
            self.network.get_submodule(info.module_path).register_forward_hook(self._hook(info))
            for info in self.layers
        ]
        try:
            self.network(x)
        finally:
            for handle in handles:
                handle.remove()


# ---------------------------------------------------------------- the lean pass

Capture = Callable[[torch.Tensor], None]


@dataclass
class _Op:
    """A module the pass runs as one step (plain ``nn.Sequential`` dissolve into these)."""

    path: str
    module: nn.Module
    chain: list[Window] | None  # depth windows, None when not local in depth
    captures: list[str] = field(default_factory=list)  # hooked paths whose map is its output
    inner: list[str] = field(default_factory=list)  # hooked paths inside it


def _flatten(module: nn.Module, path: str, hooked: set[str]) -> list[_Op]:
    if isinstance(module, nn.Sequential) and is_plain_sequential(module) and len(module) > 0:
        ops: list[_Op] = []
        for name, child in module.named_children():
            ops.extend(_flatten(child, f"{path}.{name}" if path else name, hooked))
        if path in hooked:  # a Sequential's output is its last child's
            ops[-1].captures.append(path)
        return ops
    inner = sorted(h for h in hooked if h != path and (path == "" or h.startswith(path + ".")))
    return [_Op(path, module, depth_chain(module), [path] if path in hooked else [], inner)]


def _dense_hooks(op: _Op) -> tuple[DenseSpec, dict[str, int], dict[str, int]] | None:
    """For a dense block: its spec, the hooked paths whose map is a layer's new channels
    (the layer, its conv2) and those on a layer's bottleneck modules, with the layer."""
    spec = dense_spec(op.module)
    if spec is None:
        return None
    index = {name: i for i, (name, _) in enumerate(op.module.named_children())}
    features: dict[str, int] = {}
    bottleneck: dict[str, int] = {}
    for path in op.inner:
        name, _, sub = path[len(op.path) + 1 :].partition(".")
        if sub in ("", "conv2"):
            features[path] = index[name]
        elif sub in ("norm1", "relu1", "conv1", "norm2", "relu2"):
            bottleneck[path] = index[name]
    return spec, features, bottleneck


def _streamable(op: _Op) -> bool:
    if op.chain is None:
        return False
    dense = _dense_hooks(op) if op.inner else None
    return not op.inner or (dense is not None and set(op.inner) <= set(dense[1]))


def _no_halo(op: _Op) -> bool:
    """Neighbouring output slices read disjoint input slices."""
    if op.chain is None:
        return False
    k, s, p = compose(op.chain)
    return k <= s and p == 0


def _plan(ops: list[_Op], stream_until: int) -> list[tuple[str, list[_Op]]]:
    """``("stream", ops)``: one depth pipeline; ``("whole", [block])``: a dense block in
    one push; ``("plain", [op])``: the module as it is, hooks and all."""
    stride, i = 1, 0
    while i < len(ops) and stride < stream_until and _streamable(ops[i]):
        stride *= compose(ops[i].chain or [])[1]
        i += 1
    steps: list[tuple[str, list[_Op]]] = [("stream", ops[:i])] if i else []
    for op in ops[i:]:
        if _dense_hooks(op) is not None:
            steps.append(("whole", [op]))
        elif _streamable(op) and _no_halo(op):  # a transition: stream it
            if steps and steps[-1][0] == "stream":
                steps[-1][1].append(op)
            else:
                steps.append(("stream", [op]))
        else:
            steps.append(("plain", [op]))
    return steps


def _forward_hook(fn: Capture) -> Callable[[nn.Module, object, torch.Tensor], None]:
    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        fn(output)

    return hook


@dataclass
class _Run:
    captures: Mapping[str, Capture]
    stop_after: str | None
    chunk_slices: int  # input slices per chunk
    depth: int  # of the input

    def slices(self, depth: int) -> int:
        """Chunk depth at an op of ``depth`` slices: the same share of the volume."""
        return max(1, math.ceil(self.chunk_slices * depth / self.depth))

    def fire(self, paths: Sequence[str], out: torch.Tensor) -> None:
        for path in paths:
            self.captures[path](out)

    def block(self, op: _Op, depth: int) -> tuple[DenseBlockStage, dict[str, int]]:
        dense = _dense_hooks(op)
        assert dense is not None
        spec, features, bottleneck = dense
        last = {**features, **bottleneck}.get(self.stop_after or "")
        stage = DenseBlockStage(
            spec,
            depth,
            run_layers=len(spec.layers) if last is None else last + 1,
            collect=sorted(set(features.values())),
            whole=sorted(set(bottleneck.values())),
            piece=self.slices(depth),
        )
        return stage, features

    def stream(self, ops: list[_Op], box: list[torch.Tensor], whole: bool) -> torch.Tensor | None:
        """``ops`` as one depth pipeline over chunks (one chunk when ``whole``) of the
        tensor in ``box``; None when the pass ends inside a dense block."""
        n = box[0].shape[2]
        stages: list[WindowStage | DenseBlockStage] = []
        sinks: list[Sink | None] = []
        layers: list[dict[str, int]] = []  # hooked dense layers of each stage
        depth = n
        for op in ops:
            assert op.chain is not None
            if dense_spec(op.module) is not None:
                block, features = self.block(op, depth)
                stages.append(block)
                layers.append(features)
            else:
                stages.append(WindowStage(op.module, op.chain, depth))
                layers.append({})
            depth = out_length(depth, op.chain)
            last = op is ops[-1]  # what the next stage gets may change in place (a ReLU)
            sinks.append(Sink(depth, borrow=last) if op.captures or last else None)
        if isinstance(stages[-1], DenseBlockStage) and not stages[-1].emits:
            sinks[-1] = None
        step = n if whole else self.slices(n)
        for z in range(0, n, step):
            y: torch.Tensor | None = box.pop() if step >= n else box[0][:, :, z : z + step]
            for stage, sink, op in zip(stages, sinks, ops, strict=True):
                assert y is not None
                inbox = [y]
                del y
                with record_function(PROFILE_LABEL + op.path):
                    y = stage.push(inbox)
                if y is None:
                    break
                if sink is not None:
                    sink.add(y)
            del y
        box.clear()
        for op, stage, sink, features in zip(ops, stages, sinks, layers, strict=True):
            if isinstance(stage, DenseBlockStage):
                for path, i in sorted(features.items(), key=lambda item: item[1]):
                    self.captures[path](stage.sinks[i].result())
            if sink is not None and op.captures:
                self.fire(op.captures, sink.result())
        final = sinks[-1]
        return None if final is None else final.result()


def run_hooked(
    network: nn.Module,
    x: torch.Tensor,
    captures: Mapping[str, Capture],
    *,
    stop_after: str | None = None,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
    stream_until: int = DEFAULT_STREAM_UNTIL,
) -> torch.Tensor | None:
    """Run ``network`` on ``x`` leanly; ``captures[path](map)`` gets each hooked map once.

    ``stop_after`` (a key of ``captures``) ends the pass after that module (the
    captures may also raise to end it). ``chunk_voxels``: input voxels per depth
    chunk (the streamed part's working memory grows with it, not with the
    volume); ``stream_until``: the depth stride up to which the first ops are
    streamed. Returns the network's output, or None when the pass stopped early.
    A network that is not a plain ``nn.Sequential`` runs as it is, with hooks.
    """
    if chunk_voxels < 1:
        raise ModelError(f"chunk_voxels must be at least 1, got {chunk_voxels}")
    if x.dim() != 5:
        raise ModelError(f"input must be (N, C, D, H, W), got shape {tuple(x.shape)}")
    hooked = set(captures)
    ops = _flatten(network, "", hooked)
    if stop_after is not None:  # nothing after the op that holds the last hooked module
        holds = [i for i, op in enumerate(ops) if stop_after in op.captures + op.inner]
        ops = ops[: holds[0] + 1] if holds else ops
    steps = _plan(ops, stream_until)
    served: set[str] = set()  # the paths the pass hands over itself; others get forward hooks
    for kind, group in steps:
        for op in group:
            dense = _dense_hooks(op) if kind != "plain" else None
            served.update(op.captures, dense[1] if dense else ())
    handles = [
        network.get_submodule(path).register_forward_hook(_forward_hook(captures[path]))
        for path in sorted(hooked - served)
    ]
    run = _Run(captures, stop_after, max(1, chunk_voxels // (x.shape[3] * x.shape[4])), x.shape[2])
    box = [x]
    del x
    try:
        with torch.no_grad():
            for kind, group in steps:
                if kind == "plain":
                    with record_function(PROFILE_LABEL + group[0].path):
                        out = group[0].module(box.pop())
                    run.fire(group[0].captures, out)
                else:
                    out = run.stream(group, box, whole=kind == "whole")
                if out is None:
                    return None
                box.append(out)
                del out
    finally:
        for handle in handles:
            handle.remove()
    return box.pop()
