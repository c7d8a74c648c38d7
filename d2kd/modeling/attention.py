"""
Attention maps of feature maps (Zagoruyko & Komodakis 2017; Zhang & Ma 2021, Sec. 3.1;
Yang et al. 2022, FGD Eq. 2-3), shared by FBKD, FGD and HGD.

For ``A`` of shape ``(B, C, H, W)``:
``G^s(A) = mean_c |A|`` (B, H, W) and ``G^c(A) = mean_hw |A|`` (B, C); the softmax masks
``H*W*softmax_hw(G^s/T)`` and ``C*softmax_c(G^c/T)`` average to 1.
"""

import torch
import torch.nn.functional as F
from ..losses.precision import fp32

__all__ = [
    "spatial_attention",
    "channel_attention",
    "spatial_attention_mask",
    "channel_attention_mask",
    "spatial_softmax_mask",
    "channel_softmax_mask",
]


def spatial_attention(features: torch.Tensor) -> torch.Tensor:
    """``G^s(A)_{h,w} = (1/C) sum_c |A_{c,h,w}|``, shape ``(B, H, W)``, in fp32."""
    return fp32(features).abs().mean(dim=1)


def channel_attention(features: torch.Tensor) -> torch.Tensor:
    """``G^c(A)_c = (1/HW) sum_{h,w} |A_{c,h,w}|``, shape ``(B, C)``, in fp32."""
    return fp32(features).abs().mean(dim=(2, 3))


def spatial_attention_mask(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``H*W * softmax_hw(G^s(A) / T)``, shape ``(B, H, W)``."""
    b, _, h, w = features.shape
    logits = spatial_attention(features).reshape(b, -1) / temperature
    return (h * w * F.softmax(logits, dim=1)).reshape(b, h, w)


def channel_attention_mask(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """``C * softmax_c(G^c(A) / T)``, shape ``(B, C)``."""
    c = features.shape[1]
    return c * F.softmax(channel_attention(features) / temperature, dim=1)


def spatial_softmax_mask(attention: torch.Tensor, temperature: float) -> torch.Tensor:
    """
    ``H*W * softmax_hw(G / T)`` of a given spatial attention map ``G`` (B, H, W), e.g. the
    sum ``G^s(S) + G^s(T)`` of FBKD's paper-form mask (Zhang & Ma 2021, Sec. 3.1).
    """
    b, h, w = attention.shape
    return (h * w * F.softmax(fp32(attention).reshape(b, -1) / temperature, dim=1)).reshape(b, h, w)


def channel_softmax_mask(attention: torch.Tensor, temperature: float) -> torch.Tensor:
    """``C * softmax_c(G / T)`` of a given channel attention vector ``G`` (B, C)."""
    return attention.shape[1] * F.softmax(fp32(attention) / temperature, dim=1)
