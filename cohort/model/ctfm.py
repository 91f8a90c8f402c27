"""CT-FM (project-lighter): MONAI's SegResEncoder as the CT-FM feature extractor publishes it.

The architecture is MONAI's ``monai.networks.nets.segresnet_ds.SegResEncoder``
(the version pinned in pyproject.toml) with the settings of CT-FM's
``config.json`` (``spatial_dims`` 3, ``in_channels`` 1, ``init_filters`` 32,
``blocks_down`` 1, 2, 2, 4, 4) and MONAI's defaults for the rest (ReLU,
BatchNorm with affine parameters, isotropic 3x3x3 kernels), as CT-FM's
pre-training config builds it. Five levels of pre-activation residual blocks
(32, 64, 128, 256, 512 channels), a stride-2 3x3x3 convolution between levels.

The published file ``model.safetensors`` of ``project-lighter/ct_fm_feature_extractor``
holds exactly the encoder's state dict under MONAI's names (161 tensors):
nothing is renamed or dropped.

One change of execution, not of values: MONAI's :class:`SegResBlock` adds its
input to the output of ``conv2`` in place, which would change a hooked
``conv2`` map after the hook saw it (``conv-3`` and ``conv-5`` are such maps);
:func:`build` gives the blocks a forward that adds out of place.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn

from cohort.model.weights import Published

__all__ = ["BLOCKS_DOWN", "INIT_FILTERS", "PUBLISHED", "build"]

BLOCKS_DOWN: Final = (1, 2, 2, 4, 4)
INIT_FILTERS: Final = 32
PUBLISHED: Final = Published(
    "project-lighter/ct_fm_feature_extractor", "model.safetensors", "Apache-2.0 (project-lighter)"
)


def build() -> nn.Module:
    """CT-FM's encoder from MONAI's modules, initialised by MONAI."""
    from monai.networks.nets.segresnet_ds import SegResBlock, SegResEncoder

    class SegResBlockOutOfPlace(SegResBlock):
        """MONAI's block, adding the residual out of place (same values)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x
            x = self.conv2(self.act2(self.norm2(self.conv1(self.act1(self.norm1(x))))))
            return x + identity

    network = SegResEncoder(
        spatial_dims=3, in_channels=1, init_filters=INIT_FILTERS, blocks_down=BLOCKS_DOWN
    )
    for module in network.modules():
        if type(module) is SegResBlock:
            module.__class__ = SegResBlockOutOfPlace  # forward only; same modules and weights
    return network
