"""Soft-label distillation for sigmoid (per-class binary) classifiers."""

import torch
import torch.nn.functional as F
from .precision import fp32

__all__ = ["binary_kd_div"]

BINARY_KD_FORMS = ("kl", "bce")


def binary_kd_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    form: str = "kl",
) -> torch.Tensor:
    """
    Hinton et al. 2015 soft labels for sigmoid heads (RetinaNet class logits, Detectron2's RPN
    objectness; docs/methods/dense_kd.md), element by element: every class is its own
    binary problem, so there is **no softmax across classes** (the Global Knowledge code's
    softmax over RetinaNet's sigmoid logits is the bug docs/methods/gkd.md warns about)::

        q = sigmoid(z_t / T),  p = sigmoid(z_s / T)
        "bce": T^2 * BCE(p, q)  = -T^2 * [ q log p + (1 - q) log(1 - p) ]
        "kl":  T^2 * KL(Bern(q) || Bern(p)) = T^2 * BCE(p, q) - T^2 * H(q)

    Both forms have the same gradient in the student; "kl" is zero when the student matches
    the teacher, "bce" is the formula as usually printed (docs/methods/dense_kd.md). The teacher side is detached.

    Args:
        student_logits, teacher_logits: logits of the same shape, e.g. ``(N, R, K)``.
        temperature: ``T > 0``.
        form: "kl" or "bce".

    Returns:
        The element-wise losses (fp32), of the inputs' shape; the caller sums and normalises (over
        classes and anchors, by the number of positive anchors as focal loss does).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}; "
            "teacher and student must have the same classes and anchors."
        )
    if form not in BINARY_KD_FORMS:
        raise ValueError(f"form must be one of {BINARY_KD_FORMS}, got {form!r}.")
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    # fp32 sigmoids and divergences, also under autocast (mixed precision).
    teacher_scaled = fp32(teacher_logits.detach()) / t
    q = torch.sigmoid(teacher_scaled)
    loss = F.binary_cross_entropy_with_logits(fp32(student_logits) / t, q, reduction="none")
    if form == "kl":
        loss = loss - F.binary_cross_entropy_with_logits(teacher_scaled, q, reduction="none")
    return loss * (t * t)
