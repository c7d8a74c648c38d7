"""
Mixed precision (``SOLVER.AMP``) on every device.

Detectron2's :class:`AMPTrainer` asserts CUDA. d2kd keeps it on CUDA (with
``SOLVER.AMP.PRECISION``: float16 with a gradient scaler, or bfloat16, which needs none) and
trains on a CPU with :class:`CPUAMPTrainer`: Detectron2's ``SimpleTrainer`` step with the
forward and the loss sum under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (CPU autocast
is bfloat16; bfloat16 has fp32's exponent range, so no gradient scaler). That is how the
mixed-precision path runs in CI, where there is no GPU.
"""

import logging
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["PRECISIONS", "parse_precision", "CPUAMPTrainer", "build_step_trainer"]

logger = logging.getLogger(__name__)

# Accepted spellings of a precision option (Detectron2's LazyConfig uses "float16"/"bfloat16").
PRECISIONS = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_precision(name: str, option: str = "SOLVER.AMP.PRECISION") -> torch.dtype:
    """The ``torch.dtype`` of a precision option (``"float16"``, ``"bf16"``, ...); a clear error otherwise."""
    key = str(name).strip().lower()
    if key not in PRECISIONS:
        raise ValueError(f"{option} {name!r} is not a precision; choose one of {sorted(PRECISIONS)}.")
    return PRECISIONS[key]


class CPUAMPTrainer(SimpleTrainer):
    """
    ``SimpleTrainer`` whose forward (and loss sum) runs under CPU autocast in ``precision``
    (bfloat16); backward and the optimizer step run outside it, on fp32 parameters, as in
    Detectron2's ``AMPTrainer`` but without a gradient scaler.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[CPUAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_step_trainer(cfg, model, data_loader, optimizer, device) -> SimpleTrainer:
    """
    The object that runs one training step: ``SimpleTrainer`` without AMP; with
    ``SOLVER.AMP.ENABLED``, Detectron2's ``AMPTrainer`` on CUDA (a gradient scaler for
    float16, none for bfloat16) and :class:`CPUAMPTrainer` (bfloat16) on a CPU.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    precision = parse_precision(cfg.SOLVER.AMP.get("PRECISION", "float16"))
    if precision == torch.float32:
        raise ValueError("SOLVER.AMP.PRECISION float32 is not mixed precision: set bfloat16 or float16, or AMP off.")
    device_type = torch.device(device).type
    if device_type == "cuda":
        # bfloat16 has fp32's range: no loss scaling (a disabled scaler steps the optimizer as is).
        scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
        return AMPTrainer(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
    if device_type == "cpu":
        if precision != torch.bfloat16:
            logger.info(f"SOLVER.AMP on CPU: autocast runs in bfloat16 (SOLVER.AMP.PRECISION {precision} is for CUDA).")
        return CPUAMPTrainer(model, data_loader, optimizer, precision=torch.bfloat16)
    raise ValueError(f"SOLVER.AMP.ENABLED on device {device}: d2kd supports mixed precision on cuda and cpu.")
