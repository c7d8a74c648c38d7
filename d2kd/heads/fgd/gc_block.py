"""
Global context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks
and Beyond", ICCVW 2019), in the form FGD's global distillation uses it (Yang et al., CVPR
2022, Sec. 3.3, Eq. 10; official code ``yzd-v/FGD``, ``mmdet/distillation/losses/fgd.py``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ...losses.precision import fp32, full_precision, match_parameter_dtype

__all__ = ["GlobalContextBlock"]


class GlobalContextBlock(nn.Module):
    """
    ``GC(x) = x + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j))``:

    - context modelling: a 1x1 conv ``W_k`` (C -> 1) gives a softmax over the ``H*W``
      positions; the context vector is the softmax-weighted sum of ``x`` (B, C, 1, 1);
    - transform: 1x1 conv (C -> C/2), LayerNorm over (C/2, 1, 1), ReLU, 1x1 conv (C/2 -> C);
    - fusion: broadcast addition to every position.

    Initialisation as the FGD code: ``W_k`` Kaiming-normal (fan_in, ReLU gain) with zero
    bias; the last conv zero, so ``GC(x) = x`` at the start.
    """

    def __init__(self, channels: int, ratio: float = 0.5):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_j softmax_j(W_k x_j) x_j``, shape ``(B, C, 1, 1)``; the softmax and the
        weighted sum over ``H*W`` positions in fp32 (also under autocast)."""
        b, c, h, w = x.shape
        logits = self.conv_mask(match_parameter_dtype(x, self.conv_mask.weight))
        with full_precision(x):
            weights = F.softmax(fp32(logits).reshape(b, 1, h * w), dim=2)  # (B, 1, HW)
            return torch.bmm(fp32(x).reshape(b, c, h * w), weights.transpose(1, 2)).reshape(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_add(self.context(x)).to(x.dtype)
