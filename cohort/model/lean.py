"""Exact, lean execution of the first layers: depth streaming and dense-block buffers.

The plain forward pass of the inflated DenseNet121 holds, at its peak, about
66 bytes per input voxel: the stem's output is 64 channels at half resolution
(32 bytes per voxel), its BatchNorm makes a second copy, and every dense layer
concatenates the growing feature stack anew. The pieces here run the same
modules in another order, so that nothing that large is ever held whole
(:func:`cohort.model.hooks.run_hooked` puts them together):

**Depth streaming** (:class:`WindowStage`). Convolutions, pooling, BatchNorm in
eval mode and ReLU are local along depth: output slice ``j`` of a window
``(kernel k, stride s, padding p)`` reads input slices ``j*s - p .. j*s - p + k
- 1`` only (:func:`depth_chain`). A stage receives the next slices of its
input, computes every output slice whose window is complete and keeps the few
input slices later outputs still need (its *carry*). It runs its module on a
slab that starts at a multiple of its stride and keeps only the outputs whose
window lies inside the slab or beyond a true end of the volume, so zero padding
comes in only at the true ends, and each output is computed once. A
depth-factorised convolution that sums its input sums the slab (cheap) and runs
its 2D kernel on the kept outputs only.

**One buffer per dense block** (:class:`DenseBlockStage`). The block's input
and each layer's new channels go into one ``(N, C_out, D, H, W)`` buffer; each
layer reads the channels before its own as a view: no concatenation. Streamed,
each layer lags ``r`` slices behind the one before, and a factorised conv2 that
sums its output keeps its last per-slice 2D results, so nothing is computed
twice; at full size (one push) the bottleneck runs in depth pieces, so its
widest temporary stays small.

The values are those of the plain modules up to float32 rounding (the kernels
see other shapes); the tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models.densenet import _DenseBlock, _DenseLayer

from cohort.errors import ModelError
from cohort.model.factorise import DepthFactorisedConv3d

Window = tuple[int, int, int]  # (kernel, stride, padding) along depth

# Input voxels per depth chunk. The streamed DenseNet121 prefix holds up to
# about 120 bytes per voxel of a chunk (the stem's 64-channel maps, oneDNN's
# copy of them, the carries), whatever the size of the volume: 2**23 voxels
# (32 slices of 512 x 512) is about 1 GB and took the plain pass's time;
# smaller chunks make more, smaller kernel calls (bench/SCALING.md, "Memory
# per voxel").
DEFAULT_CHUNK_VOXELS = 1 << 23
DEFAULT_STREAM_UNTIL = 8  # stream the first ops until the depth stride reaches this
PROFILE_LABEL = "lean:"  # profiler ranges name the op they run: "lean:features.conv0"
# A dense layer's depth pieces hold at least this many voxels of a slice plane times
# slices: thinner pieces make torch pick its slow im2col convolution over oneDNN.
MIN_PIECE_VOXELS = 1 << 16

_POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout3d,
)


# ---------------------------------------------------------------- depth geometry


def compose(chain: Sequence[Window]) -> Window:
    """The single window equivalent to ``chain`` applied in order (receptive field, stride)."""
    k, s, p = 1, 1, 0
    for k2, s2, p2 in chain:
        k, s, p = (k2 - 1) * s + k, s * s2, p2 * s + p
    return k, s, p


def out_length(n: int, chain: Sequence[Window]) -> int:
    """Depth of the output of ``chain`` for an input of depth ``n``."""
    for k, s, p in chain:
        n = (n + 2 * p - k) // s + 1
    return n


def _first(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], int):
        return value[0]
    raise ModelError(f"expected an int or a tuple of ints, got {value!r}")


def depth_chain(module: nn.Module) -> list[Window] | None:
    """The depth windows ``module`` applies in order, or None when it is not local in depth.

    Local means: output slice ``j`` depends only on input slices inside a window
    that moves by the stride, and zero padding (or none) at the two ends. Known:
    3D convolutions with numeric zero padding, max and average pooling without
    ceil mode, BatchNorm with running statistics in eval mode, pointwise
    activations, plain ``nn.Sequential`` of those, torchvision's dense layers
    and blocks and ResNet blocks.
    """
    if isinstance(module, nn.Conv3d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None
        d = module.dilation[0]
        return [(d * (module.kernel_size[0] - 1) + 1, module.stride[0], _first(module.padding))]
    if isinstance(module, nn.MaxPool3d):
        if module.ceil_mode or module.return_indices:
            return None
        geometry = (module.kernel_size, module.stride, module.padding, module.dilation)
        k, s, p, d = (_first(v) for v in geometry)
        return [(d * (k - 1) + 1, s, p)]
    if isinstance(module, nn.AvgPool3d):
        if module.ceil_mode:
            return None
        k, s, p = (_first(v) for v in (module.kernel_size, module.stride, module.padding))
        return [(k, s, p)]
    if isinstance(module, nn.BatchNorm3d):
        uses_batch_stats = module.training or module.running_mean is None
        return None if uses_batch_stats else []
    if isinstance(module, _POINTWISE):
        if isinstance(module, (nn.Dropout, nn.Dropout3d)) and module.training:
            return None
        return []
    if is_plain_sequential(module):
        return _chain_of(list(module.children()))
    if type(module) is _DenseLayer:
        return _dense_layer_chain(module)
    if isinstance(module, _DenseBlock) and type(module) is _DenseBlock:
        chains = [_dense_layer_chain(layer) for layer in module.values()]
        if any(c is None for c in chains):
            return None
        return [w for c in chains if c is not None for w in c]
    if type(module) in (resnet.BasicBlock, resnet.Bottleneck):
        return _resnet_block_chain(module)
    return None


def _chain_of(modules: Sequence[nn.Module]) -> list[Window] | None:
    chain: list[Window] = []
    for m in modules:
        c = depth_chain(m)
        if c is None:
            return None
        chain.extend(c)
    return chain


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _dense_layer_chain(layer: nn.Module) -> list[Window] | None:
    """A dense layer keeps the depth (its output is concatenated with its input)."""
    if not isinstance(layer, _DenseLayer) or type(layer) is not _DenseLayer or layer.training:
        return None
    parts = [layer.norm1, layer.relu1, layer.conv1, layer.norm2, layer.relu2, layer.conv2]
    chain = _chain_of(parts)
    if chain is None:
        return None
    k, s, p = compose(chain)
    return chain if s == 1 and k == 2 * p + 1 else None


def _resnet_block_chain(block: nn.Module) -> list[Window] | None:
    if block.training:
        return None
    names: tuple[str, ...] = ("conv1", "bn1", "relu", "conv2", "bn2")
    if type(block) is resnet.Bottleneck:
        names += ("conv3", "bn3")
    main = _chain_of([block.get_submodule(n) for n in names])
    if main is None:
        return None
    k, s, p = compose(main)
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        shortcut: Window = (1, 1, 0)
    else:
        short_chain = depth_chain(downsample)
        if short_chain is None:
            return None
        shortcut = compose(short_chain)
    ks, ss, ps = shortcut
    # the shortcut must land on the same output slices and read inside the main window
    if ss != s or ps > p or ks - ps > k - p:
        return None
    return main


# ---------------------------------------------------------------- stages


class Sink:
    """A full-depth tensor assembled from consecutive depth pieces. With ``borrow`` a
    piece that is all of it is kept as it is (no copy): only where nothing changes
    that piece later, such as an in-place ReLU in the next stage."""

    def __init__(self, depth: int, *, borrow: bool = True) -> None:
        self.depth = depth
        self.borrow = borrow
        self.tensor: torch.Tensor | None = None
        self.filled = 0

    def add(self, piece: torch.Tensor) -> None:
        if self.borrow and self.tensor is None and piece.shape[2] == self.depth:
            self.tensor, self.filled = piece, self.depth
            return
        if self.tensor is None:
            shape = (*piece.shape[:2], self.depth, *piece.shape[3:])
            self.tensor = piece.new_empty(shape)
        n = piece.shape[2]
        self.tensor[:, :, self.filled : self.filled + n] = piece
        self.filled += n

    def result(self) -> torch.Tensor:
        if self.tensor is None or self.filled != self.depth:
            raise ModelError(f"streamed output has {self.filled} of {self.depth} slices")
        return self.tensor


def _align(index: int, stride: int) -> int:
    """``index`` rounded down to a multiple of ``stride``, and at least 0."""
    return max(0, index) // stride * stride


class WindowStage:
    """One op as a depth stream: consumes input slices in order, emits finished outputs."""

    def __init__(self, module: nn.Module, chain: Sequence[Window], n_in: int) -> None:
        self.module = module
        self.k, self.s, self.p = compose(chain)
        self.n_in = n_in
        self.n_out = out_length(n_in, chain)
        if self.n_out < 1:
            raise ModelError(f"an input of depth {n_in} is too small for this network")
        self.carry: torch.Tensor | None = None
        self.carry_start = 0
        self.received = 0  # input slices seen
        self.done = 0  # output slices emitted

    def push(self, box: list[torch.Tensor]) -> torch.Tensor | None:
        """Take the next input slices out of ``box``; return the outputs now finished."""
        x = box.pop()
        if self.carry is None:
            buf, start = x, self.received
        else:
            buf, start = torch.cat([self.carry, x], dim=2), self.carry_start
        self.carry = None
        self.received += x.shape[2]
        del x
        end = self.received
        k, s, p = self.k, self.s, self.p
        if end >= self.n_in:
            ready = self.n_out
        else:  # outputs whose last tap is below end
            ready = min(self.n_out, (end - k + p) // s + 1 if end - k + p >= 0 else 0)
        out = None
        if ready > self.done:
            a = _align(self.done * s - p, s)
            if a < start:
                raise ModelError(f"depth streaming lost slice {a}: the carry starts at {start}")
            b = end if end >= self.n_in else min(end, (ready - 1) * s - p + k)
            out = self._run(buf[:, :, a - start : b - start], self.done - a // s, ready - self.done)
            self.done = ready
        if self.done < self.n_out:
            keep = max(_align(self.done * s - p, s), start)
            if keep < end:
                self.carry = buf[:, :, keep - start :].clone()
                self.carry_start = keep
        return out

    def _run(self, slab: torch.Tensor, lo: int, count: int) -> torch.Tensor:
        """Outputs ``lo .. lo + count - 1`` of the module on ``slab``. A depth-factorised
        convolution that sums its input runs its 2D kernel on those outputs only."""
        module = self.module
        if _sums_input(module):  # called as a module all the same: its hooks run
            assert isinstance(module, DepthFactorisedConv3d)
            summed = module.depth_sum_input(slab)[:, :, lo : lo + count]
            return module(summed, summed=True)
        y = module(slab)
        if y.shape[2] < lo + count:
            raise ModelError(
                f"depth streaming: a slab of {slab.shape[2]} slices gave {y.shape[2]} outputs, "
                f"expected at least {lo + count}"
            )
        return y[:, :, lo : lo + count]


@dataclass
class DenseSpec:
    """What a dense block needs for the buffered run."""

    layers: list[_DenseLayer]
    c0: int  # input channels
    growth: int
    radius: int  # conv2's depth padding (k = 2 r + 1)


def _not_dense_layer(layer: _DenseLayer) -> bool:
    return _dense_layer_chain(layer) is None


def dense_spec(block: nn.Module) -> DenseSpec | None:
    """The buffered run's view of a torchvision dense block, or None if it does not fit:
    every layer's bottleneck pointwise in depth, its conv2 the same odd window of
    stride 1, the input channels growing by conv2's output channels."""
    if not isinstance(block, _DenseBlock) or type(block) is not _DenseBlock:
        return None
    layers = [layer for layer in block.values() if isinstance(layer, _DenseLayer)]
    if not layers or len(layers) != len(block) or any(map(_not_dense_layer, layers)):
        return None
    first = layers[0]
    if not isinstance(first.conv1, nn.Conv3d) or not isinstance(first.conv2, nn.Conv3d):
        return None
    c0, growth = first.conv1.in_channels, first.conv2.out_channels
    window = depth_chain(first.conv2)
    for i, layer in enumerate(layers):
        bottleneck = _chain_of([layer.norm1, layer.relu1, layer.conv1, layer.norm2, layer.relu2])
        if bottleneck is None or compose(bottleneck) != (1, 1, 0):
            return None
        if depth_chain(layer.conv2) != window:
            return None
        if layer.conv1.in_channels != c0 + i * growth or layer.conv2.out_channels != growth:
            return None
    assert window is not None  # _dense_layer_chain checked it: (2 r + 1, 1, r)
    return DenseSpec(layers, c0, growth, compose(window)[2])


def _sums_input(module: nn.Module) -> bool:
    if not isinstance(module, DepthFactorisedConv3d):
        return False
    return module.profile == "mean" and not module.sums_output


def _windowed(module: nn.Module, box: list[torch.Tensor], piece: int) -> torch.Tensor:
    """``module(x)`` for the tensor in ``box``, run over depth pieces of ``piece`` slices
    (the same values; only a piece's temporaries are live at a time)."""
    x = box.pop()
    chain = depth_chain(module)
    assert chain is not None
    stage = WindowStage(module, chain, x.shape[2])
    sink = Sink(stage.n_out)
    for p0 in range(0, x.shape[2], piece):
        y = stage.push([x[:, :, p0 : p0 + piece]])
        if y is not None:
            sink.add(y)
    return sink.result()


def _sums_output(layer: _DenseLayer) -> bool:
    return isinstance(layer.conv2, DepthFactorisedConv3d) and layer.conv2.sums_output


class _Planes:
    """A dense layer's conv2 as per-slice 2D convolutions and a depth sum
    (:meth:`DepthFactorisedConv3d.planes`): the planes of the last ``2 r`` slices
    are carried to the next push, so each slice's bottleneck and 2D convolution
    run once."""

    def __init__(self) -> None:
        self.carry: torch.Tensor | None = None
        self.start = 0  # first slice of the carry
        self.end = 0  # planes computed up to here


class DenseBlockStage:
    """A dense block writing into one buffer; streams over depth or runs in one push.

    The buffer covers depth slices ``[start, ends[0])``; the input channels are
    valid up to ``ends[0]``, layer ``l``'s new channels up to ``ends[l + 1]``. A
    layer's new slice ``j`` needs its bottleneck at ``j - r .. j + r``, so each
    layer lags ``r`` slices behind the one before until the input is complete.
    A depth-factorised conv2 that sums on its output carries its planes
    (:class:`_Planes`); any other conv2 reruns on the ``2 r`` overlap slices.
    """

    def __init__(
        self,
        spec: DenseSpec,
        n: int,
        *,
        run_layers: int,
        collect: Sequence[int],
        whole: Sequence[int],
        piece: int,
    ) -> None:
        self.spec = spec
        self.n = n
        self.run_layers = run_layers  # layers to run (fewer when the pass stops inside)
        self.emits = run_layers == len(spec.layers)
        self.channels = spec.c0 + run_layers * spec.growth
        self.sinks = {i: Sink(n) for i in collect}  # new features of hooked layers
        self.whole = set(whole)  # layers whose bottleneck modules are hooked: no pieces
        self.piece = max(1, piece)
        self.planes = [_Planes() if _sums_output(layer) else None for layer in spec.layers]
        del self.planes[run_layers:]
        self.buf: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # widened as torch.cat would widen it
        self.start = 0
        self.ends = [0] * (run_layers + 1)
        self.emitted = 0

    def _keep(self) -> int:
        """The first buffer slice a later push still reads or writes."""
        r, ends = self.spec.radius, self.ends
        need = [ends[-1]]  # new channels are written, and emitted, from here on
        for i, planes in enumerate(self.planes):
            need.append(ends[i] if planes is not None else ends[i + 1] - r)
        return max(self.start, min(need), 0)

    def push(self, box: list[torch.Tensor]) -> torch.Tensor | None:
        """Take the next input slices out of ``box``; return the output slices now finished."""
        x = box.pop()
        spec, r, ends = self.spec, self.spec.radius, self.ends
        old_end = ends[0]
        new_end = old_end + x.shape[2]
        keep = self._keep()
        dtype = x.dtype if self.dtype is None else torch.promote_types(self.dtype, x.dtype)
        shape = (x.shape[0], self.channels, new_end - keep, *x.shape[3:])
        buf = x.new_empty(shape, dtype=dtype)
        if self.buf is not None and old_end > keep:
            buf[:, :, : old_end - keep] = self.buf[:, :, keep - self.start : old_end - self.start]
        self.buf = None
        buf[:, : spec.c0, old_end - keep :] = x
        del x
        self.start, ends[0] = keep, new_end
        for i in range(self.run_layers):
            u = ends[i + 1]
            v = self.n if ends[i] >= self.n else max(u, ends[i] - r)
            c_in = spec.c0 + i * spec.growth
            src = buf[:, :c_in]
            planes = self.planes[i]
            if planes is not None:
                new = self._from_planes(i, planes, src, keep, u, v)
            elif v > u:
                a, b = max(0, u - r), min(self.n, v + r)
                bottleneck = self._bottleneck(spec.layers[i], src[:, :, a - keep : b - keep], i)
                piece = self._piece(bottleneck)
                new = _windowed(spec.layers[i].conv2, [bottleneck], piece)[:, :, u - a : v - a]
            else:
                new = None
            if new is None:
                continue
            layer = spec.layers[i]
            if layer.drop_rate > 0:
                new = F.dropout(new, p=layer.drop_rate, training=layer.training)
            if torch.promote_types(buf.dtype, new.dtype) != buf.dtype:  # as torch.cat would
                buf = buf.to(torch.promote_types(buf.dtype, new.dtype))
                self.dtype = buf.dtype
            buf[:, c_in : c_in + spec.growth, u - keep : v - keep] = new
            if i in self.sinks:
                self.sinks[i].add(new)
            del new
            ends[i + 1] = v
        self.buf = buf
        if not self.emits or ends[-1] <= self.emitted:
            return None
        out = buf[:, :, self.emitted - keep : ends[-1] - keep]
        self.emitted = ends[-1]
        if self.emitted >= self.n:  # done: hand the buffer over, no copy
            self.buf = None
            return out
        return out.clone()  # the buffer's slices are still read by the next push

    def _from_planes(
        self, i: int, planes: _Planes, src: torch.Tensor, keep: int, u: int, v: int
    ) -> torch.Tensor | None:
        """Layer ``i``'s new channels on ``[u, v)``; computes the planes of the slices
        that arrived since the last push and carries those the next push needs."""
        r, avail = self.spec.radius, self.ends[i]
        conv2 = self.spec.layers[i].conv2
        assert isinstance(conv2, DepthFactorisedConv3d)
        have, start = planes.carry, planes.start
        if avail > planes.end:
            fresh = self._bottleneck(
                self.spec.layers[i], src[:, :, planes.end - keep : avail - keep], i, conv2.planes
            )
            if have is None:
                have, start = fresh, planes.end
            else:
                have = torch.cat([have, fresh], dim=2)
            del fresh
            planes.end = avail
        new = None
        if v > u:
            assert have is not None
            a, b = max(0, u - r), min(self.n, v + r)
            new = conv2(have[:, :, a - start : b - start], planes=True)[:, :, u - a : v - a]
        carry_from = max(0, v - r)
        if have is not None and carry_from < planes.end and v < self.n:
            planes.carry, planes.start = have[:, :, carry_from - start :].clone(), carry_from
        else:
            planes.carry = None
        return new

    def _bottleneck(
        self,
        layer: _DenseLayer,
        src: torch.Tensor,
        index: int,
        then: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``norm1 -> relu1 -> conv1 -> norm2 -> relu2`` (then ``then``, also pointwise in
        depth) over ``src`` in depth pieces, so only one piece's temporaries are live;
        in one go when one of those modules is hooked (its hook sees the whole map)."""

        def run(t: torch.Tensor) -> torch.Tensor:
            t = layer.relu2(layer.norm2(layer.conv1(layer.relu1(layer.norm1(t)))))
            return t if then is None else then(t)

        depth, piece = src.shape[2], self._piece(src)
        if index in self.whole or depth <= piece:
            return run(src)
        sink = Sink(depth)
        for p0 in range(0, depth, piece):
            sink.add(run(src[:, :, p0 : p0 + piece]))
        return sink.result()

    def _piece(self, x: torch.Tensor) -> int:
        return max(self.piece, -(-MIN_PIECE_VOXELS // (x.shape[3] * x.shape[4])))
