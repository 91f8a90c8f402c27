"""Exact, cheaper execution of inflated layers: the depth axis factorises out.

Inflation gives every k x k x k kernel a known depth profile. With ``mean``
inflation each depth slice is the same 2D kernel ``w / k``, so

    conv3d(x, w3d)[o] = sum over t of conv2d(x[o*s - p + t], w / k)
                      = conv2d(sum over t of x[o*s - p + t], w / k)

by linearity: a depth box sum (cheap, one channel at a time) and a 2D
convolution run on every depth slice, a third of the multiply-adds for
3 x 3 x 3 kernels and a seventh for DenseNet's 7 x 7 x 7 stem. With ``centre``
inflation only the middle slice is non-zero and the 3D convolution *is* a 2D
convolution per slice. Max pooling over a box is a max over each axis in turn.

None of this changes what the network computes, only the order of the sums
(results agree with the plain modules to float32 rounding; the tests compare
them with ``torch.nn.functional.conv3d`` and ``max_pool3d``). The replacement
modules subclass the ones they replace, keep their parameters and state-dict
keys, and are chosen by reading the kernels, not by trusting a flag: a kernel
without a depth profile keeps the plain module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cohort.errors import ModelError

DepthProfile = Literal["mean", "centre"]
_Reduce = Callable[[torch.Tensor, torch.Tensor], object]


def _add(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.add_(src)


def _max(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.maximum(dst, src, out=dst)


def window_reduce(
    x: torch.Tensor, dim: int, kernel: int, stride: int, padding: int, reduce: Literal["sum", "max"]
) -> torch.Tensor:
    """Sum or max over a sliding window along one axis, as pooling would compute it.

    Output length is ``(n + 2 * padding - kernel) // stride + 1``; positions
    outside the input count as 0 for a sum and are skipped for a max (the
    implicit padding of ``avg_pool`` with ``count_include_pad`` and of
    ``max_pool``). Each tap is one strided slice, so the cost is ``kernel``
    element-wise passes, without a padded copy of ``x``.
    """
    n = x.shape[dim]
    size = (n + 2 * padding - kernel) // stride + 1
    if size < 1:
        raise ModelError(
            f"a window of {kernel} (padding {padding}) does not fit an axis of length {n}; "
            "the input volume is too small for this network"
        )
    op: _Reduce = _add if reduce == "sum" else _max

    def tap(offset: int) -> tuple[int, int, torch.Tensor] | None:
        lo = -(offset // stride) if offset < 0 else 0  # first o with o * stride + offset >= 0
        hi = min(size - 1, (n - 1 - offset) // stride)
        if hi < lo:
            return None
        span = x.narrow(dim, lo * stride + offset, (hi - lo) * stride + 1)
        return lo, hi, span[(slice(None),) * dim + (slice(None, None, stride),)]

    taps = [t for t in (tap(k - padding) for k in range(kernel)) if t is not None]
    first = next((i for i, t in enumerate(taps) if t[0] == 0 and t[1] == size - 1), None)
    if first is not None:  # a tap that covers every output starts the result
        out = taps.pop(first)[2].clone()
    else:
        shape = list(x.shape)
        shape[dim] = size
        out = x.new_full(shape, 0.0 if reduce == "sum" else float("-inf"))
    for lo, hi, src in taps:
        op(out.narrow(dim, lo, hi - lo + 1), src)
    return out


def depth_profile(weight: torch.Tensor) -> DepthProfile | None:
    """``mean`` if every depth slice of a (out, in, kd, kh, kw) kernel is the same,
    ``centre`` if only the middle one is non-zero, else None (also for kd = 1)."""
    if weight.dim() != 5 or weight.shape[2] == 1:
        return None
    kd = weight.shape[2]
    if torch.equal(weight, weight[:, :, :1].expand_as(weight)):
        return "mean"
    if kd % 2 == 1:
        outside = torch.cat([weight[:, :, : kd // 2], weight[:, :, kd // 2 + 1 :]], dim=2)
        if not outside.any():
            return "centre"
    return None


class DepthFactorisedConv3d(nn.Conv3d):
    """A Conv3d whose kernel has a depth profile, run as depth sum + 2D convolution.

    ``mean``: the depth box sum goes on the side with fewer values (the input
    when the convolution strides in depth or widens the channels, else the
    output, before the bias). ``centre``: one 2D convolution per output slice.
    """

    profile: DepthProfile

    @classmethod
    def from_conv(cls, conv: nn.Conv3d) -> DepthFactorisedConv3d | None:
        """The factorised twin of ``conv`` sharing its parameters, or None if it has none."""
        if type(conv) is not nn.Conv3d or not _plain_geometry(conv):
            return None
        profile = depth_profile(conv.weight.detach())
        if profile is None:
            return None
        kd, pd = conv.kernel_size[0], _triple(conv.padding)[0]
        if profile == "centre" and pd != kd // 2:
            return None
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.profile = profile
        new.train(conv.training)
        return new

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if depth_profile(self.weight.detach()) != self.profile:
            raise ModelError(
                "a state dict loaded into a depth-factorised convolution has a kernel "
                f"without its {self.profile!r} depth profile; load weights before factorising"
            )

    @property
    def sums_output(self) -> bool:
        """Whether the depth box sum runs on the 2D convolution's output, so that
        ``forward(x) == depth_sum(planes(x))``; otherwise (``mean`` profile)
        ``forward(x) == plane_conv(depth_sum_input(x))``."""
        return (
            self.profile == "mean" and self.stride[0] == 1 and self.in_channels > self.out_channels
        )

    def _plane_conv(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _, ph, pw = _triple(self.padding)
        stride = (1, self.stride[1], self.stride[2])
        dilation = (1, self.dilation[1], self.dilation[2])
        plane = self.weight[:, :, :1]  # each slice is the 2D kernel / kd
        return F.conv3d(x, plane, bias, stride, (0, ph, pw), dilation, self.groups)

    def planes(self, x: torch.Tensor) -> torch.Tensor:
        """The 2D kernel ``w / kd`` on every depth slice, without bias. Output slice ``j``
        reads input slice ``j`` only, so depth ranges can be computed separately."""
        return self._plane_conv(x, None)

    def depth_sum(self, y: torch.Tensor) -> torch.Tensor:
        """The depth box sum of :meth:`planes` (zero beyond the ends), plus the bias."""
        kd, pd = self.kernel_size[0], _triple(self.padding)[0]
        y = window_reduce(y, 2, kd, 1, pd, "sum")
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)

    def depth_sum_input(self, x: torch.Tensor) -> torch.Tensor:
        """The depth box sum of the input, with the depth stride and padding."""
        kd, sd, pd = self.kernel_size[0], self.stride[0], _triple(self.padding)[0]
        return window_reduce(x, 2, kd, sd, pd, "sum")

    def plane_conv(self, summed: torch.Tensor) -> torch.Tensor:
        """The 2D kernel and the bias on every slice of :meth:`depth_sum_input`."""
        return self._plane_conv(summed, self.bias)

    def forward(
        self, x: torch.Tensor, *, planes: bool = False, summed: bool = False
    ) -> torch.Tensor:
        """The 3D convolution of ``x``; or its second half, for a caller that streams the
        first (:mod:`cohort.model.lean`): with ``planes``, ``x`` is :meth:`planes` of the
        input already (:attr:`sums_output`), with ``summed`` :meth:`depth_sum_input`."""
        if planes or summed:
            if self.profile != "mean" or planes == summed or planes != self.sums_output:
                raise ModelError(
                    f"planes={planes}, summed={summed} does not fit this convolution "
                    f"({self.profile!r} profile, sums_output={self.sums_output})"
                )
            return self.depth_sum(x) if planes else self.plane_conv(x)
        kd = self.kernel_size[0]
        _, ph, pw = _triple(self.padding)
        plane_padding = (0, ph, pw)
        plane_dilation = (1, self.dilation[1], self.dilation[2])
        if self.profile == "centre":
            middle = self.weight[:, :, kd // 2 : kd // 2 + 1]
            return F.conv3d(
                x, middle, self.bias, self.stride, plane_padding, plane_dilation, self.groups
            )
        if self.sums_output:
            return self.depth_sum(self.planes(x))
        return self.plane_conv(self.depth_sum_input(x))


class SeparableMaxPool3d(nn.MaxPool3d):
    """Max pooling over a box as three one-axis maxima (the same values, no indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s, p = (_triple(v) for v in (self.kernel_size, self.stride, self.padding))
        for axis in range(3):
            x = window_reduce(x, 2 + axis, k[axis], s[axis], p[axis], "max")
        return x

    @classmethod
    def from_pool(cls, pool: nn.MaxPool3d) -> SeparableMaxPool3d | None:
        if type(pool) is not nn.MaxPool3d or pool.return_indices or pool.ceil_mode:
            return None
        if _triple(pool.dilation) != (1, 1, 1):
            return None
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return cls(pool.kernel_size, stride=stride, padding=pool.padding)


def _triple(value: object) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    if isinstance(value, tuple) and len(value) == 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    raise ModelError(f"expected an int or a triple, got {value!r}")


def _plain_geometry(conv: nn.Conv3d) -> bool:
    return (
        not isinstance(conv.padding, str)
        and conv.padding_mode == "zeros"
        and conv.dilation[0] == 1
        and conv.kernel_size[0] > 1
    )


def factorise(network: nn.Module) -> list[str]:
    """Swap, in place, every Conv3d with a depth profile and every plain MaxPool3d
    for its factorised twin; returns the module paths that changed."""
    changed: list[str] = []
    for path, module in list(network.named_modules()):
        if not path:  # the root cannot be swapped in place
            continue
        new: nn.Module | None = None
        if isinstance(module, nn.Conv3d):
            new = DepthFactorisedConv3d.from_conv(module)
        elif isinstance(module, nn.MaxPool3d):
            new = SeparableMaxPool3d.from_pool(module)
        if new is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = network.get_submodule(parent_path) if parent_path else network
        setattr(parent, name, new)
        changed.append(path)
    return changed
