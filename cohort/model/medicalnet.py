"""MedicalNet's 3D ResNets (Tencent, Med3D): MONAI's ResNet with MedicalNet's settings.

The architecture is MONAI's ``monai.networks.nets.resnet10`` ... ``resnet50``
(the version pinned in pyproject.toml) built as MedicalNet publishes it
(``Tencent/MedicalNet``, ``models/resnet.py``): one input channel, a 7x7x7
stem of stride 2, max pooling, no bias in the shortcut convolutions, no
classifier, shortcut ``B`` (a 1x1x1 convolution) for ResNet-10 and -50 and
``A`` (zero-padded identity) for ResNet-18 and -34, as MedicalNet's README
lists them. One thing MONAI's ResNet does not build: MedicalNet's
``layer3`` and ``layer4`` keep stride 1 and dilate their 3x3x3 convolutions
by 2 and 4 instead (a segmentation network of output stride 8);
:func:`dilate` sets that on MONAI's modules, so the module paths and weight
names stay MONAI's, which are MedicalNet's without ``module.``.

The published weights (``resnet_<depth>_23dataset.pth``) are a training
checkpoint: ``{"state_dict": {"module.conv1.weight": ..., ...}}``, with the
segmentation head ``conv_seg`` where a file has it; feature extraction drops it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Final

from torch import nn

from cohort.errors import ModelError
from cohort.model.weights import Published

__all__ = ["DEPTHS", "DILATION", "HEAD", "PREFIX", "SHORTCUT", "build", "dilate", "published"]

DEPTHS: Final = (10, 18, 34, 50)
SHORTCUT: Final = {10: "B", 18: "A", 34: "A", 50: "B"}  # MedicalNet's README
DILATION: Final = {"layer3": 2, "layer4": 4}  # stride 1, dilated, as models/resnet.py
PREFIX: Final = "module."  # the checkpoints were saved from nn.DataParallel
HEAD: Final = ("conv_seg.",)  # the segmentation head: not used for features
LICENCE: Final = "MIT (Tencent/MedicalNet)"


def published(depth: int) -> Published:
    """The pretrained file of ResNet-``depth`` (23 datasets) on Hugging Face."""
    return Published(
        f"TencentMedicalNet/MedicalNet-Resnet{depth}", f"resnet_{depth}_23dataset.pth", LICENCE
    )


def build(depth: int) -> nn.Module:
    """MedicalNet's ResNet-``depth`` from MONAI's modules, initialised by MONAI."""
    from monai.networks.nets import resnet10, resnet18, resnet34, resnet50

    constructors: dict[int, Callable[..., nn.Module]] = {
        10: resnet10,
        18: resnet18,
        34: resnet34,
        50: resnet50,
    }
    if depth not in constructors:
        raise ModelError(f"MedicalNet depth {depth} is not built here; choose one of {DEPTHS}")
    network = constructors[depth](
        pretrained=False,
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=SHORTCUT[depth],
        bias_downsample=False,
        feed_forward=False,
    )
    for name, dilation in DILATION.items():
        dilate(network.get_submodule(name), dilation)
    return network


def dilate(layer: nn.Module, dilation: int) -> None:
    """Make a MONAI ResNet stage keep its input's grid: stride 1 everywhere, every
    3x3x3 convolution dilated by ``dilation`` (padding likewise, so sizes stay)."""
    for block in layer.children():
        for conv in block.children():
            if isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3):
                conv.stride = (1, 1, 1)
                conv.dilation = (dilation,) * 3
                conv.padding = (dilation,) * 3
        shortcut = getattr(block, "downsample", None)
        if isinstance(shortcut, nn.Sequential):  # type B: 1x1x1 convolution + norm
            conv = shortcut[0]
            if not isinstance(conv, nn.Conv3d):
                raise ModelError(f"unexpected shortcut {shortcut!r} in a MONAI ResNet block")
            conv.stride = (1, 1, 1)
        elif isinstance(shortcut, partial):  # type A: a strided view, zero-padded
            stride_one = partial(shortcut.func, *shortcut.args, **shortcut.keywords | {"stride": 1})
            block.downsample = stride_one  # type: ignore[assignment]  # a plain attribute
        block.stride = 1  # type: ignore[assignment]  # a plain attribute of MONAI's blocks
