"""Distances between predicted class distributions."""

import torch
import torch.nn.functional as F

__all__ = ["kd_kl_div"]


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """
    Hinton et al. 2015 soft-label loss on softmax logits (methods.md 5.1)::

        T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ),   summed over classes, mean over rows

    Rows are RoIs (or anchors); an empty set gives a zero that keeps the graph.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}; "
            "teacher and student must have the same classes."
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * (t * t)
