"""
Adapters (connectors): map a student feature onto the teacher's channels and size.

Chen et al. 2017 (Sec. 3.3) and FitNets (Romero et al. 2015) regress the student's guided
layer onto the teacher's hint layer through an adaptation layer ``r``; Chen et al. find it
helps even when the channel counts already match (Table 4, Hints vs Hints-A). Spatial
alignment (bilinear resize) covers different strides and input resolutions.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.precision import match_parameter_dtype

__all__ = ["FeatureAdapter"]


class FeatureAdapter(nn.Module):
    """
    ``conv(k x k, student channels -> teacher channels)`` [+ ReLU], then a bilinear resize
    to the teacher's spatial size when the two differ.

    Args:
        in_channels, out_channels: student and teacher channels.
        kernel_size: 1 (Chen et al., FitNet) or 3 (FGFI, DeFeat, GKD).
        enabled: False = identity, which requires equal channels.
        init_std: if set, weights ~ N(0, init_std) and zero bias (FGFI uses 1e-4); else
            PyTorch's default initialisation.
        relu: append a ReLU (FGFI's adapter).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        enabled: bool = True,
        init_std: Optional[float] = None,
        relu: bool = False,
    ):
        super().__init__()
        if not enabled and in_channels != out_channels:
            raise ValueError(
                f"The adapter is disabled but the student has {in_channels} channels and the "
                f"teacher {out_channels}; enable the adapter or pair features of equal width."
            )
        self.conv = (
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
            if enabled
            else None
        )
        if self.conv is not None and init_std is not None:
            nn.init.normal_(self.conv.weight, std=init_std)
            nn.init.zeros_(self.conv.bias)
        self.relu = relu and enabled

    def forward(self, x: torch.Tensor, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if self.conv is not None:
            # fp32 parameters: under autocast the conv runs in the autocast dtype; outside it a
            # reduced-precision input is cast to the parameters' dtype.
            x = self.conv(match_parameter_dtype(x, self.conv.weight))
            if self.relu:
                x = F.relu(x)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x
