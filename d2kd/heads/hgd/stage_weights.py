"""
Stage ("macro") weights: how much each distilled stage counts, across stages and over
training, so that no stage dominates the sum of per-stage losses (the
HGD-like head, docs/methods/hgd.md). The running statistics are buffers and the learned
log-variances parameters of the module, so both are checkpointed with the head and
survive a resume.

Modes (``L_k`` the unweighted loss of stage ``k``, ``b_k`` configured base weights, ``N``
the number of stages; the total is ``sum_k rho_k L_k`` [+ a regulariser]):

- ``"fixed"``: ``rho_k = b_k``.
- ``"loss_norm"``: ``rho_k = Z * (b_k / m_k) / sum_j (b_j / m_j)``, with ``m_k`` an
  exponential moving average of ``L_k`` (detached; averaged over processes under DDP) and
  ``Z = N`` (``normalize_to="num_stages"``: the weights average 1) or ``Z = 1``
  (``"one"``). Every stage then contributes ``rho_k L_k ~ Z b_k / sum_j (b_j / m_j)``:
  equal shares for equal ``b``. ``m_k`` is floored at ``1e-4 * max_j m_j`` so a stage whose
  loss vanishes cannot take all the weight (weight ratios are bounded by 1e4).
- ``"learned"``: uncertainty weighting (Kendall et al., CVPR 2018): ``rho_k = b_k *
  exp(-s_k)`` with a learned log-variance ``s_k`` (initialised to 0), plus the regulariser
  ``sum_k s_k``. The constraint ``|s_k| < log_var_limit`` is a smooth bound,
  ``s_k = limit * tanh(u_k / limit)`` of the free parameter ``u_k`` (it never stops the
  gradient, unlike a clamp), so every weight stays in ``(b_k e^-limit, b_k e^limit)``.
  Its optimum ``rho_k = 1 / L_k`` (for ``b = 1``) equalises the stages' contributions; the
  weights are not sum-normalised.
"""

from typing import Dict, Optional, Sequence

import torch
from detectron2.utils import comm
from torch import nn

__all__ = ["MACRO_MODES", "StageWeighting"]

MACRO_MODES = ("fixed", "loss_norm", "learned")
_NORMALIZE_TO = ("num_stages", "one")
_FLOOR_RATIO = 1e-4


class StageWeighting(nn.Module):
    """
    Args:
        stages: stage names, in the order of the losses given to :meth:`forward`.
        mode: one of :data:`MACRO_MODES`.
        base_weights: ``b_k`` per stage (empty: 1 each).
        momentum: EMA momentum of ``"loss_norm"`` (``m <- momentum * m + (1 - momentum) * L``;
            the first update sets ``m = L``).
        normalize_to: ``"num_stages"`` (sum of weights = N) or ``"one"`` (sum = 1), for
            ``"loss_norm"``.
        log_var_limit: the bound on ``|s_k|`` of ``"learned"``.

    The running statistics are updated in every mode (they are logged), but only
    ``"loss_norm"`` uses them.
    """

    def __init__(
        self,
        stages: Sequence[str],
        mode: str = "loss_norm",
        base_weights: Optional[Sequence[float]] = None,
        momentum: float = 0.9,
        normalize_to: str = "num_stages",
        log_var_limit: float = 4.0,
    ):
        super().__init__()
        self.stages = list(stages)
        n = len(self.stages)
        if n == 0:
            raise ValueError("StageWeighting needs at least one stage.")
        if mode not in MACRO_MODES:
            raise ValueError(f"Unknown macro re-weighting mode {mode!r}; choose one of {MACRO_MODES}.")
        base_weights = list(base_weights) if base_weights else [1.0] * n
        if len(base_weights) != n:
            raise ValueError(
                f"{len(base_weights)} stage weights given for {n} stages {self.stages}; give one per stage "
                "(in the order of the stages) or none."
            )
        if any(w < 0 for w in base_weights) or not any(w > 0 for w in base_weights):
            raise ValueError(f"Stage weights must be >= 0 with at least one > 0, got {base_weights}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"The EMA momentum must be in [0, 1), got {momentum}.")
        if normalize_to not in _NORMALIZE_TO:
            raise ValueError(f"normalize_to must be one of {_NORMALIZE_TO}, got {normalize_to!r}.")
        if log_var_limit <= 0:
            raise ValueError(f"The log-variance limit must be > 0, got {log_var_limit}.")
        self.mode = mode
        self.momentum = float(momentum)
        self.normalize_to = normalize_to
        self.log_var_limit = float(log_var_limit)
        self.register_buffer("base_weights", torch.tensor(base_weights, dtype=torch.float32), persistent=False)
        # Running statistics (checkpointed): the EMA of each stage's loss and the update count.
        self.register_buffer("loss_ema", torch.zeros(n))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.log_vars = nn.Parameter(torch.zeros(n)) if mode == "learned" else None

    @torch.no_grad()
    def update(self, losses: torch.Tensor):
        """Fold one step's detached per-stage losses ``(N,)`` into the running averages."""
        losses = losses.detach().float().to(self.loss_ema.device)
        if comm.get_world_size() > 1:
            losses = losses.clone()
            torch.distributed.all_reduce(losses)
            losses /= comm.get_world_size()
        if int(self.num_updates) == 0:
            self.loss_ema.copy_(losses)
        else:
            self.loss_ema.mul_(self.momentum).add_(losses, alpha=1.0 - self.momentum)
        self.num_updates += 1

    def clamped_log_vars(self) -> torch.Tensor:
        """``s = limit * tanh(u / limit)``: the bounded log-variances of ``"learned"``."""
        return self.log_var_limit * torch.tanh(self.log_vars / self.log_var_limit)

    def weights(self) -> torch.Tensor:
        """The current ``rho`` ``(N,)``; differentiable only in ``"learned"`` mode."""
        if self.mode == "fixed":
            return self.base_weights.clone()
        if self.mode == "learned":
            return self.base_weights * torch.exp(-self.clamped_log_vars())
        ema = self.loss_ema
        floor = torch.clamp(ema.max() * _FLOOR_RATIO, min=1e-12)
        inverse = self.base_weights / torch.maximum(ema, floor)
        total = len(self.stages) if self.normalize_to == "num_stages" else 1.0
        return total * inverse / inverse.sum()

    def forward(self, losses: Dict[str, torch.Tensor]):
        """
        ``losses``: stage -> unweighted scalar loss. Updates the running statistics (in
        training mode) and returns ``(weighted, weights, regulariser)``: stage -> ``rho_k L_k``,
        the ``(N,)`` weights used, and the ``"learned"`` regulariser (``None`` otherwise).
        """
        missing = [s for s in self.stages if s not in losses]
        if missing:
            raise KeyError(f"No loss for stages {missing}.")
        stacked = torch.stack([losses[s].float() for s in self.stages])
        if self.training:  # tracked in every mode (logged); only "loss_norm" uses them
            self.update(stacked)
        weights = self.weights()
        if self.mode != "learned":
            weights = weights.detach()
        weighted = {s: weights[i].to(losses[s].dtype) * losses[s] for i, s in enumerate(self.stages)}
        regulariser = self.clamped_log_vars().sum() if self.mode == "learned" else None
        return weighted, weights, regulariser
