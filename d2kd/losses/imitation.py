"""
Spatially weighted feature imitation: the masked hint losses of FGFI (Wang et al. 2019,
Eq. 4), DeFeat and the HGD-like reconstruction (docs/methods/hgd.md), in one formula.
"""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from .precision import fp32

__all__ = ["weighted_imitation_loss", "weighted_imitation_losses", "standardize_features", "IMITATION_DISTANCES"]

IMITATION_DISTANCES = ("l2", "l1", "smooth_l1")


def standardize_features(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean and unit variance per image and channel over ``(H, W)``, in fp32."""
    x = fp32(x)  # fp32 statistics under mixed precision
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.var(dim=(2, 3), keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mean) / std


def weighted_imitation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    distance: str = "l2",
    channel_reduction: str = "mean",
    normalizer: str = "weight_sum",
    half: bool = True,
    beta: float = 1.0,
) -> torch.Tensor:
    """
    ``L = s * sum_{b,c,h,w} w_{b,h,w} d(S - T)_{b,c,h,w} / (N_c * Z)`` with

    - ``d``: ``"l2"`` (``x^2``), ``"l1"`` (``|x|``) or ``"smooth_l1"`` (Huber with ``beta``);
    - ``s``: 1/2 if ``half`` (the ``1/2`` of docs/methods/hgd.md), else 1;
    - ``N_c``: the channel count for ``channel_reduction="mean"`` (so maps of different
      widths are comparable), 1 for ``"sum"`` (docs/methods/hgd.md as printed);
    - ``Z``: ``sum_{b,h,w} w`` for ``normalizer="weight_sum"`` (a weighted mean over cells,
      pooled over the batch), or the cell count ``B*H*W`` for ``"num_cells"`` (then
      down-weighted cells lower the loss instead of being re-normalised away).

    ``student``/``teacher`` are ``(B, C, H, W)``, ``weight`` is ``(B, H, W)``; the teacher
    and the weight are detached. A zero normaliser (e.g. only zero weights) gives a zero
    that keeps the graph.
    """
    return weighted_imitation_losses(
        student, teacher, [weight], distance, channel_reduction, normalizer, half, beta
    )[0]


def weighted_imitation_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: Sequence[torch.Tensor],
    distance: str = "l2",
    channel_reduction: str = "mean",
    normalizer: str = "weight_sum",
    half: bool = True,
    beta: float = 1.0,
) -> List[torch.Tensor]:
    """
    :func:`weighted_imitation_loss` for several weight maps of the same pair of features
    (e.g. DeFeat's foreground mask and background complement), computing the distance map
    ``d(S - T)`` once: one loss per weight map, in order.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    b, c, h, w = student.shape
    for weight in weights:
        if tuple(weight.shape) != (b, h, w):
            raise ValueError(f"The weight map must be (B, H, W) = {(b, h, w)}, got {tuple(weight.shape)}.")
    if channel_reduction not in ("mean", "sum"):
        raise ValueError(f"channel_reduction must be 'mean' or 'sum', got {channel_reduction!r}.")
    if normalizer not in ("weight_sum", "num_cells"):
        raise ValueError(f"normalizer must be 'weight_sum' or 'num_cells', got {normalizer!r}.")
    # fp32 distances, sums and normalisers, also under autocast (mixed precision).
    diff = fp32(student) - fp32(teacher.detach())
    if distance == "l2":
        d = diff * diff
    elif distance == "l1":
        d = diff.abs()
    elif distance == "smooth_l1":
        d = F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=beta)
    else:
        raise ValueError(f"Unknown imitation distance {distance!r}; choose one of {IMITATION_DISTANCES}.")
    cell_distance = d.sum(dim=1)  # (B, H, W)
    if channel_reduction == "mean":
        cell_distance = cell_distance / c
    scale = 0.5 if half else 1.0
    losses = []
    for weight in weights:
        weight = weight.detach().to(d.dtype)
        numerator = (cell_distance * weight).sum()
        if normalizer == "weight_sum":
            denominator = weight.sum()
        else:
            denominator = torch.tensor(float(b * h * w), dtype=d.dtype, device=d.device)
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        losses.append(torch.where(denominator > 0, scale * numerator / safe, numerator * 0.0))
    return losses
