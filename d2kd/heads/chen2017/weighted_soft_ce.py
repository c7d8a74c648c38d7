"""
Class-weighted soft cross entropy (Chen et al., NIPS 2017, Eq. 3; docs/methods/chen2017.md).

Both functions return one value per sample (row / element); the caller sums and divides by
its own normaliser (Detectron2's number of sampled regions), so they compose with the
detector's losses. The teacher side is always detached.
"""

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from ...losses.precision import fp32

__all__ = ["weighted_soft_cross_entropy", "binary_weighted_soft_cross_entropy", "background_last_class_weights"]


def background_last_class_weights(num_classes: int, background_weight: float = 1.5, device=None) -> torch.Tensor:
    """
    ``(K+1,)`` class weights ``w_c = 1`` for the K foreground classes and
    ``w_K = background_weight`` for the background, which Detectron2 puts in the LAST column
    of ``FastRCNNOutputLayers`` scores (the 2017 code had it at index 0: docs/methods/chen2017.md).
    """
    weights = torch.ones(num_classes + 1, device=device)
    weights[num_classes] = background_weight
    return weights


def weighted_soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    class_weights: Union[torch.Tensor, Sequence[float], None] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    Chen et al. 2017, Eq. 3, on softmax logits ``(R, C)``::

        L_soft(i) = - sum_c  w_c * P_t[i, c] * log P_s[i, c],
        P_t = softmax(z_t / T),  P_s = softmax(z_s / T)

    The weight is indexed by the class ``c`` inside the sum, not by the sample's label.
    No ``T^2`` factor (the paper has none; T = 1 is its best setting).

    Returns:
        ``(R,)`` per-row losses (empty for R = 0, still attached to the student's graph).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Logit shapes differ: student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}; "
            "teacher and student must have the same classes."
        )
    t = float(temperature)
    # fp32 softmaxes (mixed precision)
    log_p_student = F.log_softmax(fp32(student_logits) / t, dim=1)
    p_teacher = F.softmax(fp32(teacher_logits.detach()) / t, dim=1)
    terms = p_teacher * log_p_student
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=terms.dtype, device=terms.device)
        if class_weights.shape != (terms.shape[1],):
            raise ValueError(f"class_weights has shape {tuple(class_weights.shape)}; expected ({terms.shape[1]},).")
        terms = terms * class_weights
    return -terms.sum(dim=1)


def binary_weighted_soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    foreground_weight: float = 1.0,
    background_weight: float = 1.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    Chen et al.'s weighted soft cross entropy for a one-logit (sigmoid) objectness, as
    Detectron2's RPN predicts it (docs/methods/chen2017.md, "Detectron2 specifics")::

        L(a) = - [ w_fg * q_a * log sigma(z_s,a / T) + w_bg * (1 - q_a) * log(1 - sigma(z_s,a / T)) ],
        q_a = sigma(z_t,a / T)

    This is the 2-way softmax of Eq. 3 with logits ``(0, z)``: the background (not-object)
    class carries ``w_bg``.

    Returns:
        per-element losses, shaped like the inputs.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Objectness shapes differ: student {tuple(student_logits.shape)} vs teacher "
            f"{tuple(teacher_logits.shape)}; both models must score the same anchors."
        )
    t = float(temperature)
    z_s = fp32(student_logits) / t  # fp32 (mixed precision)
    q = torch.sigmoid(fp32(teacher_logits.detach()) / t)
    # log sigma(z) = -softplus(-z), log(1 - sigma(z)) = -softplus(z): stable for large |z|.
    return foreground_weight * q * F.softplus(-z_s) + background_weight * (1.0 - q) * F.softplus(z_s)
