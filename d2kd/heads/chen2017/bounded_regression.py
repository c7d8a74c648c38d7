"""
Teacher-bounded regression (Chen et al., NIPS 2017, Eq. 4; docs/methods/chen2017.md).

The student is pushed towards the ground truth only where its error exceeds the teacher's
by a margin; the teacher is an upper bound, not a target. The condition is evaluated per
sample on the whole box-delta vector, and only the student's distance carries gradient.
"""

import torch
from ...losses.precision import fp32

__all__ = ["regression_distance", "teacher_bounded_regression", "REGRESSION_NORMS"]

REGRESSION_NORMS = ("l2", "l1")


def regression_distance(pred: torch.Tensor, target: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """
    Per-sample distance of ``(R, D)`` vectors: ``||pred - target||_2^2`` ("l2", Eq. 4) or
    ``||pred - target||_1`` ("l1", the variant Chen et al. mention). Returns ``(R,)``.
    """
    diff = fp32(pred) - fp32(target)  # fp32 norms (mixed precision)
    if norm == "l2":
        return (diff * diff).sum(dim=1)
    if norm == "l1":
        return diff.abs().sum(dim=1)
    raise ValueError(f"Unknown regression norm '{norm}'; use one of {REGRESSION_NORMS}.")


def teacher_bounded_regression(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    margin: float = 0.0,
    norm: str = "l2",
) -> torch.Tensor:
    """
    Chen et al. 2017, Eq. 4, per sample ``i`` (rows of ``(R, 4)`` delta tensors)::

        L_b(i) = ||R_s(i) - y(i)||^2   if ||R_s(i) - y(i)||^2 + m > ||R_t(i) - y(i)||^2
               = 0                     otherwise

    The comparison is not differentiated; only ``||R_s - y||^2`` carries gradient, and
    nothing flows to the teacher or the target. ``m`` is in delta units.

    Returns:
        ``(R,)`` per-sample losses.
    """
    if student.shape != teacher.shape or student.shape != target.shape:
        raise ValueError(
            f"Regression shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
            f"target {tuple(target.shape)}."
        )
    target = target.detach()
    student_distance = regression_distance(student, target, norm)
    with torch.no_grad():
        teacher_distance = regression_distance(teacher.detach(), target, norm)
        active = (student_distance.detach() + float(margin)) > teacher_distance
    return student_distance * active.to(student_distance.dtype)
