"""
Training hooks of d2kd: a guard that stops at the first non-finite loss term.

Detectron2's ``SimpleTrainer`` notices a non-finite total loss only after ``backward`` and
prints the whole loss dict (``Loss became infinite or NaN at iteration=...``). The guard
checks every term as soon as the training forward returns, before ``backward`` and the
optimizer step, so the parameters never take the bad update and no checkpoint of a bad
state is written; its error names the term(s), the iteration, the last good checkpoint and
the options that usually fix it.
"""

import math
from typing import Mapping, Optional

import torch
from detectron2.engine import HookBase

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "check_finite_losses", "head_option_nodes"]


class NonFiniteLossError(FloatingPointError):
    """A loss term is NaN or infinite; the message names the term(s) and the iteration."""


def _value(v) -> float:
    if torch.is_tensor(v):
        return float(v.detach().float().sum())
    return float(v)


def check_finite_losses(
    loss_dict: Mapping[str, object],
    iteration: int,
    last_checkpoint: Optional[str] = None,
    head_options: Optional[Mapping[str, str]] = None,
):
    """
    Raise :class:`NonFiniteLossError` if a value of ``loss_dict`` is NaN or infinite.

    Args:
        loss_dict: ``name -> scalar`` (tensors or numbers).
        iteration: the current iteration, for the message.
        last_checkpoint: the newest checkpoint written before this step, if any.
        head_options: ``head name -> config node`` (e.g. ``{"fitnet": "DISTILL.FITNET"}``),
            to point at the weight of a failing distillation term.
    """
    tensors = [v for v in loss_dict.values() if torch.is_tensor(v)]
    if tensors:  # one device sync for the common all-finite case
        all_finite = bool(torch.stack([t.detach().float().sum() for t in tensors]).isfinite().all())
        if all_finite and all(math.isfinite(float(v)) for v in loss_dict.values() if not torch.is_tensor(v)):
            return
    values = {k: _value(v) for k, v in loss_dict.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    good = {k: v for k, v in values.items() if k not in bad}
    raise NonFiniteLossError(_message(bad, good, iteration, last_checkpoint, head_options or {}))


def _head_of(term: str, head_options: Mapping[str, str]) -> Optional[str]:
    if not term.startswith("loss_kd_"):
        return None
    rest = term[len("loss_kd_"):]
    matches = [h for h in head_options if rest == h or rest.startswith(h + "_")]
    return max(matches, key=len) if matches else None


def _message(bad, good, iteration, last_checkpoint, head_options) -> str:
    bad_text = ", ".join(f"{k} = {v}" for k, v in bad.items())
    good_text = ", ".join(f"{k}={v:.4g}" for k, v in good.items()) or "none"
    lines = [
        f"Non-finite loss at iteration {iteration}: {bad_text} (finite terms: {good_text}).",
        "Training stopped before this step's update, so the parameters are those of the previous step.",
    ]
    if last_checkpoint:
        lines.append(f"The last good checkpoint is {last_checkpoint}; continue from it with --resume after a fix.")
    else:
        lines.append("No checkpoint was written before this step.")
    heads = sorted({h for h in (_head_of(k, head_options) for k in bad) if h})
    fixes = []
    if heads:
        nodes = ", ".join(f"{head_options[h]}.WEIGHT" for h in heads)
        fixes.append(f"lower the distillation weight ({nodes}) or delay it (DISTILL.WARMUP_ITERS)")
    fixes += [
        "lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS",
        "clip gradients (SOLVER.CLIP_GRADIENTS.ENABLED True)",
    ]
    if any(not k.startswith("loss_kd_") for k in bad):
        fixes.append("check the dataset's boxes (a detector loss is non-finite)")
    lines.append("Likely fixes: " + "; ".join(fixes) + ".")
    return " ".join(lines)


class NonFiniteLossGuard(HookBase):
    """
    Checks the loss dict of every training forward (a forward hook on ``trainer.model``,
    installed in ``before_train`` and removed in ``after_train``) and raises
    :class:`NonFiniteLossError` at the first NaN/inf term.

    Args:
        head_options: ``head name -> config node``, see :func:`check_finite_losses`.
    """

    def __init__(self, head_options: Optional[Mapping[str, str]] = None):
        self._head_options = dict(head_options or {})
        self._handle = None

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _last_checkpoint(self) -> Optional[str]:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        try:
            if checkpointer is not None and checkpointer.has_checkpoint():
                return checkpointer.get_checkpoint_file()
        except Exception:  # reporting only; never hide the loss error
            return None
        return None

    def _check(self, module, inputs, output):
        if not module.training or not isinstance(output, Mapping):
            return
        check_finite_losses(output, self.trainer.iter, self._last_checkpoint(), self._head_options)


def head_option_nodes(heads: Mapping[str, object]) -> dict:
    """``{head name: "DISTILL.<KEY>"}`` for the built heads (for the guard's message)."""
    out = {}
    for name, head in heads.items():
        key = getattr(type(head), "config_key", None)
        out[name] = f"DISTILL.{key()}" if callable(key) else f"DISTILL.{name.upper()}"
    return out

