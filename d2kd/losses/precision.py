"""
Precision helpers of the heads under mixed precision (``SOLVER.AMP``).

Inside an autocast region matmuls and convolutions run in bf16/fp16. The heads compute their
softmaxes, divergences, norms and normalisers in fp32: they cast their inputs with
``.float()`` and, where a matmul/einsum feeds such a quantity, run it in
:func:`full_precision` (autocast off), so the result does not depend on the step's precision
beyond the rounding of the features themselves.
"""

import torch

__all__ = ["fp32", "full_precision", "match_parameter_dtype"]


def full_precision(like: torch.Tensor):
    """A context with autocast disabled on the device of ``like`` (fp32 matmuls and convolutions inside)."""
    return torch.autocast(like.device.type, enabled=False)


def match_parameter_dtype(x: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """
    ``x`` cast to ``parameter``'s dtype when autocast is off on its device (an fp32 module
    given bf16 features, e.g. a record kept from an AMP step); under autocast ``x`` is
    returned as it is and autocast picks the precision of each operation.
    """
    if x.dtype != parameter.dtype and x.is_floating_point() and not torch.is_autocast_enabled(x.device.type):
        return x.to(parameter.dtype)
    return x


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least single precision: bf16/fp16 -> fp32; fp32 and fp64 (tests' references) unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) or not x.is_floating_point() else x.float()
