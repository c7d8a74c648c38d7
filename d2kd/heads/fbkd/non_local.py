"""
Non-local blocks (Wang et al., CVPR 2018, "Non-local Neural Networks", Eq. 1-4), in the
embedded dot-product form with max-pooled keys/values that FBKD's non-local distillation uses
(Zhang & Ma, ICLR 2021, Sec. 3.2; docs/methods/fbkd.md).
"""

import math

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from fvcore.nn import weight_init
from torch import nn

from ...losses.precision import match_parameter_dtype

__all__ = ["NonLocalBlock", "NON_LOCAL_NORMS"]

# "" (no norm: W_z itself is zero-initialised), "GN", "BN", "SyncBN".
NON_LOCAL_NORMS = ("", "GN", "BN", "SyncBN")


def _build_norm(norm: str, channels: int) -> nn.Module:
    if norm == "GN":
        # The largest group count <= 32 that divides the channels (32 for 128/256 channels).
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)


class NonLocalBlock(nn.Module):
    """
    ``NL(X) = X + N(W_z( (1/N_p) * theta(X)^T phi(P(X)) g(P(X)) ))``

    - ``theta, phi, g``: 1x1 convs ``C -> C_i`` (weights ~ N(0, 0.01), as mmcv's NonLocal2d);
    - ``P``: max-pool with kernel = stride = ``pool_stride`` on the phi and g branches
      (clamped to the map size, so a map smaller than the stride pools to one cell);
    - ``N_p``: number of pooled positions (the "dot_product" normalisation);
    - ``W_z``: 1x1 conv ``C_i -> C`` followed by the norm ``N``, whose affine weight and bias
      are **zero-initialised**, so ``NL(X) = X`` at the start. With ``norm=""`` the conv
      ``W_z`` itself is zero-initialised instead.

    The original uses BatchNorm; with 2-4 images per process (CPU) GroupNorm is the stable
    choice, hence the ``norm`` option.
    """

    def __init__(self, channels: int, inner_channels: int, pool_stride: int = 1, norm: str = "GN"):
        super().__init__()
        if norm not in NON_LOCAL_NORMS:
            raise ValueError(f"Non-local norm must be one of {NON_LOCAL_NORMS}, got '{norm}'.")
        if inner_channels < 1 or pool_stride < 1:
            raise ValueError(
                f"Non-local inner channels and pool stride must be >= 1, got {inner_channels}, {pool_stride}."
            )
        self.inner_channels = inner_channels
        self.pool_stride = pool_stride
        self.theta = nn.Conv2d(channels, inner_channels, 1)
        self.phi = nn.Conv2d(channels, inner_channels, 1)
        self.g = nn.Conv2d(channels, inner_channels, 1)
        self.w_z = nn.Conv2d(inner_channels, channels, 1, bias=not norm)
        self.norm = _build_norm(norm, channels) if norm else None
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        if self.norm is not None:
            weight_init.c2_msra_fill(self.w_z)
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
        else:
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_stride == 1:
            return x
        kernel = (min(self.pool_stride, x.shape[-2]), min(self.pool_stride, x.shape[-1]))
        return F.max_pool2d(x, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = match_parameter_dtype(x, self.theta.weight)  # bf16 features outside autocast
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, HW, C_i)
        phi = self._pool(self.phi(x)).flatten(2)  # (B, C_i, N_p)
        g = self._pool(self.g(x)).flatten(2).transpose(1, 2)  # (B, N_p, C_i)
        affinity = torch.bmm(theta, phi) / phi.shape[-1]  # (B, HW, N_p)
        y = torch.bmm(affinity, g).transpose(1, 2).reshape(b, self.inner_channels, h, w)
        y = self.w_z(y)
        if self.norm is not None:
            y = self.norm(y)
        return x + y
