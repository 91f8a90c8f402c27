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
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cohort.errors import ModelError

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
    """

    def __init__(
        self, network: nn.Module, layers: Sequence[LayerInfo], *, stop_early: bool = True
    ) -> None:
        super().__init__()
        if not layers:
            raise ModelError("no layers to hook")
        self.network = network
        self.layers = tuple(layers)
        self.stop_early = stop_early
        self._last = max(self.layers, key=lambda info: info.rank).module_path
        self._captured: dict[str, torch.Tensor] = {}
        for info in self.layers:
            network.get_submodule(info.module_path)  # fails early on a wrong path

    def _hook(self, info: LayerInfo) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if info.layer not in self._captured:
                self._captured[info.layer] = output
            if self.stop_early and info.module_path == self._last:
                raise _LastHookReachedError

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # Hooks live only for this call, so the network is left as it was found.
        self._captured = {}
        handles = [
            self.network.get_submodule(info.module_path).register_forward_hook(self._hook(info))
            for info in self.layers
        ]
        try:
            self.network(x)
        except _LastHookReachedError:
            pass
        finally:
            for handle in handles:
                handle.remove()
        captured, self._captured = self._captured, {}
        missing = [info.layer for info in self.layers if info.layer not in captured]
        if missing:
            raise ModelError(f"hooked layers {missing} did not run for input {tuple(x.shape)}")
        return {info.layer: captured[info.layer] for info in self.layers}
