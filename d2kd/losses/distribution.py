"""Distances between predicted class distributions."""

import torch
import torch.nn.functional as F
from .precision import fp32

__all__ = ["kd_kl_div"]


def kd_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    Hinton et al. 2015 soft-label loss on softmax logits (docs/methods/kd.md)::

        T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ),   summed over classes, mean over rows

    Rows are RoIs (or anchors); an empty set gives a zero that keeps the graph.

    ``reduction="none"`` returns the ``(R,)`` row terms (already times ``T^2``) instead of their
    mean, for callers that weight rows (the Global Knowledge response term). Computed in fp32
    whatever the logits' dtype (mixed precision).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}; "
            "teacher and student must have the same classes."
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum(dim=1) * 0.0 if reduction == "none" else student_logits.sum() * 0.0
    t = float(temperature)
    # fp32 softmaxes and divergence, also under autocast (bf16 logits of close models would
    # lose the small KL entirely).
    log_p_student = F.log_softmax(fp32(student_logits) / t, dim=1)
    log_p_teacher = F.log_softmax(fp32(teacher_logits.detach()) / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    if reduction == "none":
        return kl * (t * t)
    return kl.mean() * (t * t)
