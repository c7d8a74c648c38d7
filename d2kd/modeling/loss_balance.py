"""
Automatic loss balance (``DISTILL.LOSS_BALANCE``): one multiplier per head, measured once.

The paper weights of a method were set for its paper's inputs (COCO at 800 pixels, 8 GPUs);
on other data a head's term can start many times the detector loss, or be negligible, and a
method's result then follows its loss scale more than its idea. Mode ``initial`` measures,
over the first ``ITERS`` iterations at which every head distils (the distiller skips
``DISTILL.WARMUP_ITERS`` and any head's own ``warmup_iters``, such as FGFI's), the running
mean of each head's total term ``D_h`` (before any multiplier) and of the detector's loss ``L_det``; it then fixes

    m_h = TARGET * mean(L_det) / mean(D_h)          (capped at MAX_MULTIPLIER when > 0)

so that every head's total is ``TARGET`` times the detector loss at that point, and keeps
``m_h`` for the rest of the run. While measuring, every head's terms are multiplied by
``MEASURE_MULTIPLIER``: 0 (the default) computes and measures them but trains the student on
the detector loss alone, so a head whose paper weight is far off its data (CWD starts at 8x
the detector loss on BCCD) does not shape the student before its multiplier is fixed; 1 trains
with the paper weights while measuring. A head's own terms keep their relative weights: each term is
multiplied by its head's ``m_h``. The means are averaged over the processes of a multi-process
run before ``m_h`` is computed, so every rank applies the same multipliers. Everything is kept
in buffers, so the multipliers are checkpointed and restored on resume. Terms whose name ends
in ``logvar`` (learned-weight regularisers, which may be negative) are scaled but not measured.
"""

import logging
from typing import Dict, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["LossBalance", "LOSS_BALANCE_MODES", "REGULARIZER_SUFFIXES", "METRIC_PREFIX"]

LOSS_BALANCE_MODES = ("off", "initial")
# The multipliers' metric names: ``distill_balance/<head>``. Not ``loss_*``: Detectron2's console
# printer lists every metric named with "loss" among the losses, and readers of metrics.json
# (the study's loss-scale table, tools/plot_metrics.py) sum ``loss_*`` keys as losses.
METRIC_PREFIX = "distill_balance/"
REGULARIZER_SUFFIXES = ("logvar",)

logger = logging.getLogger(__name__)


class LossBalance(nn.Module):
    """
    Args:
        head_names: the distillation heads, in a fixed order.
        mode: "off" (multipliers stay 1: the paper weights) or "initial".
        target: each head's total as a fraction of the detector loss after the measurement.
        measure_iters: iterations with distillation on over which the means are taken.
        max_multiplier: cap on a multiplier (0: no cap).
        measure_multiplier: the multiplier of every head while measuring (0: measured, not trained).
    """

    def __init__(self, head_names: Sequence[str], mode: str = "off", target: float = 0.5, measure_iters: int = 20,
                 max_multiplier: float = 0.0, measure_multiplier: float = 0.0):
        super().__init__()
        if mode not in LOSS_BALANCE_MODES:
            raise ValueError(f"DISTILL.LOSS_BALANCE.MODE is {mode!r}; choose one of {LOSS_BALANCE_MODES}.")
        if mode == "initial" and (target <= 0 or measure_iters < 1):
            raise ValueError(
                "DISTILL.LOSS_BALANCE needs TARGET > 0 and ITERS >= 1 in mode 'initial' "
                f"(got TARGET {target}, ITERS {measure_iters})."
            )
        if measure_multiplier < 0:
            raise ValueError(
                f"DISTILL.LOSS_BALANCE.MEASURE_MULTIPLIER is {measure_multiplier}; use 0 (measure without training "
                "on the heads' terms) or a positive multiplier such as 1 (the paper weights)."
            )
        self.head_names = list(head_names)
        self.mode = mode
        self.target = float(target)
        self.measure_iters = int(measure_iters)
        self.max_multiplier = float(max_multiplier)
        self.measure_multiplier = float(measure_multiplier)
        n = len(self.head_names)
        self.register_buffer("multipliers", torch.ones(n, dtype=torch.float64))
        self.register_buffer("head_sums", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("detector_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("measured", torch.zeros((), dtype=torch.long))
        self.register_buffer("frozen", torch.tensor(mode == "off"))
        self._fixed = None  # the multipliers as Python floats once frozen: no device sync per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fixed = None  # a resumed state: read the buffers again

    @classmethod
    def from_config(cls, cfg, head_names: Sequence[str]) -> "LossBalance":
        opts = cfg.DISTILL.LOSS_BALANCE
        return cls(head_names, opts.MODE, opts.TARGET, opts.ITERS, opts.MAX_MULTIPLIER, opts.MEASURE_MULTIPLIER)

    def multiplier(self, head_name: str) -> float:
        """A head's fixed multiplier (1 before the measurement has fixed it)."""
        return float(self.multipliers[self.head_names.index(head_name)])

    def as_dict(self) -> Dict[str, float]:
        """The multipliers fixed by the measurement (1 each before it has fixed them)."""
        if self._fixed is not None:
            return dict(self._fixed)
        values = {name: float(m) for name, m in zip(self.head_names, self.multipliers.tolist())}
        if bool(self.frozen):
            self._fixed = values
        return dict(values)

    def applied(self) -> Dict[str, float]:
        """The multipliers to apply at this iteration: ``MEASURE_MULTIPLIER`` while measuring, then the fixed ones."""
        if self._fixed is not None or bool(self.frozen):
            return self.as_dict()
        return {name: self.measure_multiplier for name in self.head_names}

    @torch.no_grad()
    def observe(self, head_terms: Dict[str, Dict[str, torch.Tensor]], detector_losses: Dict[str, torch.Tensor]) -> bool:
        """
        Record one iteration with distillation on (``head_terms``: head -> term -> value, before
        any multiplier). Returns True at the iteration that fixes the multipliers.
        """
        if self._fixed is not None or bool(self.frozen):
            return False
        for i, name in enumerate(self.head_names):
            measured = [v for t, v in head_terms.get(name, {}).items() if not t.endswith(REGULARIZER_SUFFIXES)]
            self.head_sums[i] += float(sum(float(v.detach()) for v in measured))
        self.detector_sum += float(sum(float(v.detach()) for v in detector_losses.values()))
        self.measured += 1
        if int(self.measured) < self.measure_iters:
            return False
        self._fix()
        return True

    def _fix(self):
        sums = torch.cat([self.head_sums, self.detector_sum.reshape(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            reduced = sums.to(torch.float64)
            dist.all_reduce(reduced)  # same sums, same count on every rank: the same multipliers
            sums = reduced / dist.get_world_size()
        head_means = sums[:-1] / float(self.measured)
        detector_mean = sums[-1] / float(self.measured)
        multipliers = torch.where(
            head_means > 0, self.target * detector_mean / head_means.clamp(min=1e-12), torch.ones_like(head_means)
        )
        if self.max_multiplier > 0:
            multipliers = multipliers.clamp(max=self.max_multiplier)
        unmeasured = [name for name, mean in zip(self.head_names, head_means.tolist()) if mean <= 0]
        if unmeasured:
            logger.warning(
                f"DISTILL.LOSS_BALANCE: the terms of {unmeasured} were 0 over the {int(self.measured)} measured "
                "iterations, so their multipliers stay 1 (the paper weights). Measure over more iterations "
                "(DISTILL.LOSS_BALANCE.ITERS) or check that the head distils from the start."
            )
        self.multipliers.copy_(multipliers)
        self.frozen.fill_(True)
        self._fixed = None
