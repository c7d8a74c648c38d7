"""
Training hooks of d2kd: a guard that stops a diverging run at the first non-finite value.

Detectron2's ``SimpleTrainer`` notices a non-finite total loss only after ``backward`` and
prints the whole loss dict (``Loss became infinite or NaN at iteration=...``); a non-finite
gradient it passes to the optimizer. The guard checks every loss term as soon as the training
forward returns, before ``backward``, and every gradient before the optimizer step, so the
parameters never take the bad update and no checkpoint of a bad state is written
(:class:`~d2kd.engine.checkpoint.SafeCheckpointer` refuses one anyway). Every divergence stop,
the detector's own ``FloatingPointError`` included (see ``DistillTrainer.run_step``), raises a
:class:`TrainingDivergedError` naming what went non-finite, the iteration, the last checkpoint
to resume from and the options that usually fix it.
"""

import math
from typing import Iterable, Mapping, Optional, Sequence

import torch
from detectron2.engine import HookBase

__all__ = [
    "TrainingDivergedError",
    "NonFiniteLossError",
    "NonFiniteGradientError",
    "NonFiniteLossGuard",
    "check_finite_losses",
    "check_finite_gradients",
    "divergence_message",
    "likely_fixes",
    "last_checkpoint_of",
    "head_option_nodes",
]


class TrainingDivergedError(FloatingPointError):
    """Training went non-finite; the message names what, where, the checkpoint to resume from and the fixes."""


class NonFiniteLossError(TrainingDivergedError):
    """A loss term is NaN or infinite; the message names the term(s) and the iteration."""


class NonFiniteGradientError(TrainingDivergedError):
    """A gradient is NaN or infinite; the message names the parameter(s) and the iteration."""


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
    head_options = head_options or {}
    good_text = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in bad) or "none"
    problem = (
        f"Non-finite loss at iteration {iteration}: {', '.join(f'{k} = {v}' for k, v in bad.items())} "
        f"(finite terms: {good_text})."
    )
    heads = {h for h in (_head_of(k, head_options) for k in bad) if h}
    fixes = likely_fixes([head_options[h] for h in sorted(heads)], data=any(not k.startswith("loss_kd_") for k in bad))
    raise NonFiniteLossError(divergence_message(problem, last_checkpoint, fixes))


def check_finite_gradients(
    named_parameters: Iterable,
    iteration: int,
    last_checkpoint: Optional[str] = None,
    head_options: Optional[Mapping[str, str]] = None,
):
    """
    Raise :class:`NonFiniteGradientError` if the gradient of a parameter is NaN or infinite.

    Args:
        named_parameters: ``(name, parameter)`` pairs; names ``heads.<head>.…`` (the
            distillation model's) point the message at that head's weight.
        iteration, last_checkpoint, head_options: as for :func:`check_finite_losses`.
    """
    with_grad = [(n, p.grad) for n, p in named_parameters if p.grad is not None]
    # One pass and one device sync for the common all-finite case: a sum holding a NaN/inf is
    # not finite (a sum of huge finite values may overflow: the exact check below clears it).
    if not with_grad or bool(torch.stack([g.detach().float().sum() for _, g in with_grad]).isfinite().all()):
        return
    bad = [n[len("module."):] if n.startswith("module.") else n for n, g in with_grad if not torch.isfinite(g).all()]
    if not bad:
        return
    head_options = head_options or {}
    owners = {n.split(".")[1] if n.startswith("heads.") and n.split(".")[1] in head_options else None for n in bad}
    heads = sorted(head_options) if None in owners else sorted(owners)  # a student gradient: any loss may be the cause
    problem = (
        f"Non-finite gradient at iteration {iteration} in {len(bad)} parameter(s): "
        f"{bad[:6]}{' ...' if len(bad) > 6 else ''} (every loss term was finite)."
    )
    raise NonFiniteGradientError(divergence_message(problem, last_checkpoint, likely_fixes([head_options[h] for h in heads])))


def likely_fixes(weight_nodes: Sequence[str] = (), data: bool = False) -> str:
    """The usual remedies of a divergence: the heads' weights (``weight_nodes``: config nodes
    like ``DISTILL.FITNET``), the learning rate and warm-up, gradient clipping, and with
    ``data`` (a detector loss went non-finite) the dataset's boxes."""
    fixes = []
    if weight_nodes:
        nodes = ", ".join(f"{n}.WEIGHT" for n in weight_nodes)
        fixes.append(f"lower the distillation weight ({nodes}) or delay it (DISTILL.WARMUP_ITERS)")
    fixes += [
        "lower SOLVER.BASE_LR or lengthen SOLVER.WARMUP_ITERS",
        "clip gradients (SOLVER.CLIP_GRADIENTS.ENABLED True)",
    ]
    if data:
        fixes.append("check the dataset's boxes (a detector loss is non-finite)")
    return "Likely fixes: " + "; ".join(fixes) + "."


def divergence_message(problem: str, last_checkpoint: Optional[str], fixes: str, before_update: bool = True) -> str:
    """
    The one message of a divergence stop: ``problem`` (what went non-finite, at which
    iteration), whether the parameters took the bad update, the last checkpoint to resume
    from (d2kd never writes a non-finite one) and ``fixes`` (:func:`likely_fixes`).
    """
    lines = [problem]
    if before_update:
        lines.append("Training stopped before this step's update, so the parameters are those of the previous step.")
    if last_checkpoint:
        lines.append(
            f"The last good checkpoint is {last_checkpoint} (all values finite); continue from it with --resume "
            "after a fix (if the run diverges again at once, write the name of an earlier model_*.pth into "
            "OUTPUT_DIR/last_checkpoint and resume from that)."
        )
    else:
        lines.append("No checkpoint was written before this step.")
    lines.append(fixes)
    return " ".join(lines)


def last_checkpoint_of(checkpointer) -> Optional[str]:
    """The checkpoint a ``--resume`` would continue from (``OUTPUT_DIR/last_checkpoint``), or None."""
    try:
        if checkpointer is not None and checkpointer.has_checkpoint():
            return checkpointer.get_checkpoint_file() or None
    except Exception:  # reporting only; never hide the divergence error
        return None
    return None


def _head_of(term: str, head_options: Mapping[str, str]) -> Optional[str]:
    if not term.startswith("loss_kd_"):
        return None
    rest = term[len("loss_kd_"):]
    matches = [h for h in head_options if rest == h or rest.startswith(h + "_")]
    return max(matches, key=len) if matches else None


class NonFiniteLossGuard(HookBase):
    """
    Checks the loss dict of every training forward (a forward hook on ``trainer.model``) and
    every gradient before the optimizer steps (a step pre-hook on ``trainer.optimizer``), both
    installed in ``before_train`` and removed in ``after_train``; raises
    :class:`NonFiniteLossError` / :class:`NonFiniteGradientError` at the first NaN/inf.

    With AMP the grad scaler skips the optimizer step (and so the pre-hook) on inf gradients,
    as it should; only a non-finite loss stops such a run.

    Args:
        head_options: ``head name -> config node``, see :func:`check_finite_losses`.
    """

    def __init__(self, head_options: Optional[Mapping[str, str]] = None):
        self._head_options = dict(head_options or {})
        self._handles = []

    def before_train(self):
        self._handles = [self.trainer.model.register_forward_hook(self._check)]
        optimizer = getattr(self.trainer, "optimizer", None)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._check_gradients))

    def after_train(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _last_checkpoint(self) -> Optional[str]:
        return last_checkpoint_of(getattr(self.trainer, "checkpointer", None))

    def _check(self, module, inputs, output):
        if not module.training or not isinstance(output, Mapping):
            return
        check_finite_losses(output, self.trainer.iter, self._last_checkpoint(), self._head_options)

    def _check_gradients(self, optimizer, args, kwargs):
        check_finite_gradients(
            self.trainer.model.named_parameters(), self.trainer.iter, self._last_checkpoint(), self._head_options
        )


def head_option_nodes(heads: Mapping[str, object]) -> dict:
    """``{head name: "DISTILL.<KEY>"}`` for the built heads (for the guard's message)."""
    out = {}
    for name, head in heads.items():
        key = getattr(type(head), "config_key", None)
        out[name] = f"DISTILL.{key()}" if callable(key) else f"DISTILL.{name.upper()}"
    return out

