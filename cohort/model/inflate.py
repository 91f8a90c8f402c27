"""Generic 2D -> 3D inflation of a torchvision module tree.

A 2D layer becomes its 3D counterpart with the depth axis given the same
kernel size, stride, padding and dilation as the height axis. Convolution
kernels are inflated as in I3D (Carreira and Zisserman, 2017):

* ``mean``: a k x k kernel becomes k x k x k, each depth slice the 2D kernel
  divided by k. A volume made of one 2D image repeated along depth then gives,
  away from the depth borders, exactly the 2D network's activations.
* ``centre``: the 2D kernel sits in the central depth slice, the others are
  zero (same property, a sharper depth profile).

A 1 x 1 kernel stays 1 x 1 x 1. BatchNorm keeps its affine parameters and its
running statistics. Every parameter and buffer of the 2D tree must be carried
over: :class:`TransferReport` accounts for each, and anything left over is an
:class:`~cohort.errors.InflationError`, never a silent default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models import densenet, resnet

from cohort.config import Inflation
from cohort.errors import InflationError

__all__ = [
    "CONVERTERS",
    "PASS_THROUGH",
    "Converter",
    "TransferReport",
    "Triple",
    "inflate",
    "inflate_kernel",
]

Triple = tuple[int, int, int]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise InflationError(f"expected an int or a pair, got {value!r}")
    return (int(value[0]), int(value[1]))


def _with_depth(value: int | tuple[int, ...]) -> Triple:
    """(h, w) -> (h, h, w): the depth axis copies the height axis."""
    h, w = _pair(value)
    return (h, h, w)


def inflate_kernel(weight: torch.Tensor, depth: int, method: Inflation) -> torch.Tensor:
    """Inflate a (out, in, kh, kw) kernel to (out, in, depth, kh, kw)."""
    if weight.dim() != 4:
        raise InflationError(f"a 2D kernel has 4 dimensions, got shape {tuple(weight.shape)}")
    if method == "mean":  # divided once per 2D value: the same floats as dividing each slice
        return (weight / depth).unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()
    if method == "centre":
        out = torch.zeros(
            (*weight.shape[:2], depth, *weight.shape[2:]), dtype=weight.dtype, device=weight.device
        )
        out[:, :, depth // 2] = weight
        return out
    raise InflationError(f"unknown inflation method {method!r}; use 'mean' or 'centre'")


def _conv(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.Conv2d):
        raise TypeError(type(m))
    kernel = _with_depth(m.kernel_size)
    padding: str | Triple = m.padding if isinstance(m.padding, str) else _with_depth(m.padding)
    conv = nn.Conv3d(
        m.in_channels,
        m.out_channels,
        kernel_size=kernel,
        stride=_with_depth(m.stride),
        padding=padding,
        dilation=_with_depth(m.dilation),
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
        device="meta",  # no default initialisation: the weights are set right below
    )
    with torch.no_grad():
        dtype = torch.get_default_dtype()  # what a freshly made Conv3d would hold
        weight = inflate_kernel(m.weight.detach(), kernel[0], method).to(dtype)
        conv.weight = nn.Parameter(weight, requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            bias = m.bias.detach().to(dtype, copy=True)
            conv.bias = nn.Parameter(bias, requires_grad=m.bias.requires_grad)
    names = ("weight", "bias") if m.bias is not None else ("weight",)
    return conv, names


def _batchnorm(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.BatchNorm2d):
        raise TypeError(type(m))
    bn = nn.BatchNorm3d(
        m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
    )
    state = m.state_dict()
    bn.load_state_dict(state, strict=True)
    bn.train(m.training)
    return bn, tuple(state)


def _maxpool(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.MaxPool2d):
        raise TypeError(type(m))
    kernel = _with_depth(m.kernel_size)
    return (
        nn.MaxPool3d(
            kernel,
            stride=_with_depth(m.stride) if m.stride is not None else kernel,
            padding=_with_depth(m.padding),
            dilation=_with_depth(m.dilation),
            return_indices=m.return_indices,
            ceil_mode=m.ceil_mode,
        ),
        (),
    )


def _avgpool(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.AvgPool2d):
        raise TypeError(type(m))
    kernel = _with_depth(m.kernel_size)
    # A fixed divisor replaces kh*kw in 2D; in 3D the window holds kd times more
    # values, so the divisor grows by kd to keep depth-constant inputs unchanged.
    divisor = None if m.divisor_override is None else m.divisor_override * kernel[0]
    return (
        nn.AvgPool3d(
            kernel,
            stride=_with_depth(m.stride) if m.stride is not None else kernel,
            padding=_with_depth(m.padding),
            ceil_mode=m.ceil_mode,
            count_include_pad=m.count_include_pad,
            divisor_override=divisor,
        ),
        (),
    )


def _adaptive_size(size: object) -> tuple[int | None, int | None, int | None]:
    if size is None or isinstance(size, int):
        return (size, size, size)
    if isinstance(size, tuple) and len(size) == 2:
        h, w = size
        return (h, h, w)
    raise InflationError(f"unsupported adaptive pooling output size {size!r}")


def _adaptive_avg(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.AdaptiveAvgPool2d):
        raise TypeError(type(m))
    return nn.AdaptiveAvgPool3d(_adaptive_size(m.output_size)), ()


def _adaptive_max(m: nn.Module, method: Inflation) -> tuple[nn.Module, tuple[str, ...]]:
    if not isinstance(m, nn.AdaptiveMaxPool2d):
        raise TypeError(type(m))
    return nn.AdaptiveMaxPool3d(_adaptive_size(m.output_size), m.return_indices), ()


Converter = Callable[[nn.Module, Inflation], tuple[nn.Module, tuple[str, ...]]]

# Layers that change with dimension: type -> converter returning the 3D module
# and the local names of the parameters and buffers it carried over.
CONVERTERS: dict[type[nn.Module], Converter] = {
    nn.Conv2d: _conv,
    nn.BatchNorm2d: _batchnorm,
    nn.MaxPool2d: _maxpool,
    nn.AvgPool2d: _avgpool,
    nn.AdaptiveAvgPool2d: _adaptive_avg,
    nn.AdaptiveMaxPool2d: _adaptive_max,
}

# Modules whose own forward is the same in 2D and 3D: element-wise layers and
# containers whose forward only calls children, concatenates on the channel
# axis or adds. Each entry was read and checked; a type not listed here or in
# CONVERTERS is refused rather than guessed.
PASS_THROUGH: frozenset[type[nn.Module]] = frozenset(
    {
        nn.ReLU,
        nn.Identity,
        nn.Dropout,
        nn.Sequential,
        nn.ModuleList,
        nn.ModuleDict,
        densenet._DenseLayer,
        densenet._DenseBlock,
        densenet._Transition,
        resnet.BasicBlock,
        resnet.Bottleneck,
    }
)


@dataclass
class TransferReport:
    """Where every 2D parameter and buffer went."""

    transferred: dict[str, str] = field(default_factory=dict)  # 2D key -> how it was carried
    dropped: dict[str, str] = field(default_factory=dict)  # 2D key -> why it was left out

    def note(self, key: str, how: str) -> None:
        self.transferred[key] = how

    def drop(self, key: str, why: str) -> None:
        self.dropped[key] = why

    def summary(self) -> str:
        return (
            f"{len(self.transferred)} tensors carried over, {len(self.dropped)} dropped by design"
        )


def _state_keys(module: nn.Module) -> set[str]:
    return set(module.state_dict(keep_vars=True))


def inflate(module2d: nn.Module, method: Inflation = "mean") -> tuple[nn.Module, TransferReport]:
    """Return a 3D copy of ``module2d`` and the report of what was carried over.

    The input module is left unchanged. Raises :class:`InflationError` naming
    the module path of the first layer type that has no 3D rule, or any 2D
    tensor that did not reach the 3D module.
    """
    report = TransferReport()
    root_converter = CONVERTERS.get(type(module2d))
    if root_converter is not None:
        module3d, carried = root_converter(module2d, method)
        for local in carried:
            report.note(local, _how(module2d, local))
    else:
        _check_pass_through(module2d, "<root>")
        module3d = copy.deepcopy(module2d)
        _inflate_children(module3d, "", method, report)
    transferred = set(report.transferred)
    _refuse(
        _state_keys(module2d) - transferred,
        "2D tensors were not carried over to 3D",
        "add a 3D rule for the module that owns them",
    )
    _refuse(
        _state_keys(module3d) - transferred,
        "3D tensors have no 2D source",
        "they would keep a default initialisation",
    )
    return module3d, report


def _refuse(keys: set[str], what: str, fix: str) -> None:
    if keys:
        names = sorted(keys)
        raise InflationError(f"{len(names)} {what}: {', '.join(names[:8])}; {fix}")


def _inflate_children(
    parent: nn.Module, prefix: str, method: Inflation, report: TransferReport
) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}{name}"
        converter = CONVERTERS.get(type(child))
        if converter is not None:
            new, carried = converter(child, method)
            for local in carried:
                report.note(f"{path}.{local}", _how(child, local))
            setattr(parent, name, new)
        else:
            _check_pass_through(child, path)
            _inflate_children(child, f"{path}.", method, report)


def _how(module: nn.Module, local: str) -> str:
    return "inflated" if isinstance(module, nn.Conv2d) and local == "weight" else "copied"


def _check_pass_through(module: nn.Module, path: str) -> None:
    kind = type(module)
    if kind not in PASS_THROUGH:
        raise InflationError(
            f"no 3D rule for {kind.__module__}.{kind.__qualname__} at {path!r}; "
            f"supported layers: {', '.join(sorted(t.__name__ for t in CONVERTERS))}; "
            f"pass-through: {', '.join(sorted(t.__name__ for t in PASS_THROUGH))}"
        )
    own = [*module._parameters.values(), *module._buffers.values()]
    if any(tensor is not None for tensor in own):
        raise InflationError(
            f"module {path!r} ({kind.__name__}) holds tensors of its own; "
            "it needs a 3D rule, not a pass-through"
        )
