"""
The loss terms of FGD (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for
Detectors", Eqs. 6-10; docs/methods/fgd.md), as the official code ``yzd-v/FGD`` reduces them:
every sum runs over ``C*H*W`` and the batch, then is divided by the batch size ``B`` (no
other normalisation, so the values grow with the input size and the channel count).
"""

from typing import Tuple

import torch

__all__ = ["fgd_feature_loss", "fgd_attention_loss", "fgd_global_loss"]


def fgd_feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    fg_mask: torch.Tensor,
    bg_mask: torch.Tensor,
    spatial_attention: torch.Tensor,
    channel_attention: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    FGD focal feature loss (Eq. 6), the foreground and background sums::

        fg = sum_{b,c,h,w} M^fg_{b,h,w} A^S_{b,h,w} A^C_{b,c} (S - T)^2 / B
        bg = sum_{b,c,h,w} M^bg_{b,h,w} A^S_{b,h,w} A^C_{b,c} (S - T)^2 / B

    ``M^fg = M * S`` (the binary box mask times the scale mask) and ``M^bg = (1 - M) * S``
    (Eq. 4-5) are ``(B, H, W)``; ``A^S`` (B, H, W) and ``A^C`` (B, C) are the **teacher's**
    attention masks (Eq. 2-3). The teacher, the masks and the attention are detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    b = student.shape[0]
    sq = (student - teacher.detach()) ** 2
    weight = spatial_attention.detach()[:, None] * channel_attention.detach()[:, :, None, None]
    weighted = sq * weight
    fg = (weighted * fg_mask.detach()[:, None]).sum() / b
    bg = (weighted * bg_mask.detach()[:, None]).sum() / b
    return fg, bg


def fgd_attention_loss(
    spatial_student: torch.Tensor,
    spatial_teacher: torch.Tensor,
    channel_student: torch.Tensor,
    channel_teacher: torch.Tensor,
) -> torch.Tensor:
    """
    FGD attention loss (Eq. 7): ``(sum |A^C_t - A^C_s| + sum |A^S_t - A^S_s|) / B``, the L1
    distance of the student's attention masks to the (detached) teacher's.
    """
    b = spatial_student.shape[0]
    return ((channel_teacher.detach() - channel_student).abs().sum() + (spatial_teacher.detach() - spatial_student).abs().sum()) / b


def fgd_global_loss(student_context: torch.Tensor, teacher_context: torch.Tensor) -> torch.Tensor:
    """
    FGD global (relation) loss (Eq. 10): ``sum (GC_t(T) - GC_s(S))^2 / B`` of the two global
    context blocks' outputs. Not detached on the teacher side: the teacher's GcBlock is a
    trainable part of the head (the teacher's own features carry no gradient).
    """
    if student_context.shape != teacher_context.shape:
        raise ValueError(
            f"Context shapes differ: student {tuple(student_context.shape)} vs teacher {tuple(teacher_context.shape)}."
        )
    return ((teacher_context - student_context) ** 2).sum() / student_context.shape[0]
