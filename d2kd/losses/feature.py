"""Feature-imitation distances."""

import torch
from .precision import fp32

__all__ = ["feature_mse"]


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """
    Mean squared error over all ``B*C*H*W`` elements: the per-level FitNets hint
    ``||u_T - r(v_S)||^2`` (Romero et al. 2015, Eq. 2; Chen et al. 2017, Eq. 5) with the
    per-level mean that docs/methods/fitnet.md recommends for FPN maps. The teacher is detached;
    computed in fp32 (a mean over ``B*C*H*W`` squares is imprecise in half precision).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    return ((fp32(student) - fp32(teacher.detach())) ** 2).mean()  # fp32 under mixed precision
