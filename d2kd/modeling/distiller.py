"""
The module the trainer optimises: the student plus the distillation heads.

The teacher is held by reference and is **not** a submodule, so it is not in the
state_dict, the optimizer or the DDP wrapper, and ``train()`` never reaches it. In eval
mode the module is exactly the student.
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ..capture import Recorder, Records
from ..step import StepInputs
from .loss_balance import METRIC_PREFIX, LossBalance
from .schedule import DistillSchedule
from .teacher import TeacherRunner

__all__ = ["DistillationModel", "DistillStep", "head_terms", "zero_terms"]

logger = logging.getLogger(__name__)


@dataclass
class DistillStep:
    """
    What one training forward of :class:`DistillationModel` computed
    (:attr:`DistillationModel.last_step`).

    Attributes:
        iteration: the step's iteration.
        factor: the schedule's factor on every distillation term (0: distillation off).
        records: ``"student"`` and, when the teacher ran, ``"teacher"``: what the recorders
            handed to the heads.
        terms: head -> term -> value, before the factor and the multipliers (a head that did
            not distil has the zero term ``""``).
        multipliers: the ``DISTILL.LOSS_BALANCE`` multiplier applied to each head ({}: none).
    """

    iteration: int
    factor: float
    records: Dict[str, Records]
    terms: Dict[str, Dict[str, torch.Tensor]]
    multipliers: Dict[str, float]


def zero_terms(head: nn.Module, device) -> Dict[str, torch.Tensor]:
    """
    The terms of a head that does not distil at this step (during ``DISTILL.WARMUP_ITERS``,
    after ``STOP_ITER``, or in the head's own warm-up): a single zero term ``""`` that touches
    every trainable parameter of the head, so DDP sees the same parameters used at every step
    and needs no ``find_unused_parameters``.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    return {"": sum((p.sum() * 0.0 for p in params), torch.zeros((), device=device))}


def head_terms(head: nn.Module, student: Records, teacher: Records, step: StepInputs) -> Dict[str, torch.Tensor]:
    """
    ``head(student, teacher, step)``, or its :func:`zero_terms` while its own warm-up is not over
    (``step.iteration < head.warmup_iters``, e.g. FGFI's ``WARMUP_ITERS``).
    """
    if step.iteration < head.warmup_iters:
        return zero_terms(head, step.student_images.tensor.device)
    return head(student, teacher, step)


class DistillationModel(nn.Module):
    """
    Args:
        student: a Detectron2 meta-architecture in training mode.
        teacher: the frozen teacher (kept outside the module tree).
        heads: the distillation heads (their trainable parts are submodules).
        schedule: maps the iteration to a factor on every distillation term.
        teacher_input_scale: the teacher's input resolution relative to the student's.
        loss_balance: one multiplier per head (``DISTILL.LOSS_BALANCE``); None: the paper weights.
        teacher_precision: ``DISTILL.TEACHER.PRECISION``: the teacher's forward precision
            ("" follows the step); the heads receive fp32 teacher records either way.

    A training forward returns the detector's losses and, per head, ``loss_kd_<head>[_<term>]
    = factor(iteration) * multiplier(head) * term``. A head distils from the iteration its own
    ``warmup_iters`` ends (:func:`head_terms`); before it, and while the schedule's factor is 0,
    it contributes :func:`zero_terms`. The teacher does not run at a step where no head distils.

    Under mixed precision (``SOLVER.AMP``) the whole forward, heads included, runs in the
    trainer's autocast: student records are reduced precision, teacher records fp32, and the
    heads compute their softmaxes, divergences, norms and normalisers in fp32.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        heads: nn.ModuleDict,
        schedule: DistillSchedule,
        teacher_input_scale: float = 1.0,
        loss_balance: Optional[LossBalance] = None,
        teacher_precision: str = "",
    ):
        super().__init__()
        self.student = student
        self.heads = heads
        # The first iteration at which every head distils: DISTILL.LOSS_BALANCE measures from
        # here and --check steps here.
        self.heads_warmup_iters = max((head.warmup_iters for head in heads.values()), default=0)
        self.schedule = schedule
        self.loss_balance = loss_balance
        object.__setattr__(self, "teacher", teacher)  # not registered as a submodule
        self._keep_last_step = False
        self._last_step: Optional[DistillStep] = None
        self._balance_on = True

        student_modules = sorted({m for h in heads.values() for m in h.student_modules})
        student_methods = sorted({m for h in heads.values() for m in h.student_methods} | {"preprocess_image"})
        teacher_modules = sorted({m for h in heads.values() for m in h.teacher_modules})
        teacher_methods = sorted({m for h in heads.values() for m in h.teacher_methods})
        teacher_parts = set().union(*[h.teacher_parts for h in heads.values()]) if len(heads) else set()
        self.student_recorder = Recorder(student, student_modules, student_methods, role="student")
        self.teacher_recorder = Recorder(teacher, teacher_modules, teacher_methods, role="teacher")
        self.teacher_runner = TeacherRunner(
            teacher, teacher_parts, self.teacher_recorder, student.input_format, teacher_input_scale, teacher_precision
        )
        logger.info(
            f"Distillation heads {list(heads.keys())}; student captures {student_modules + student_methods}; "
            f"teacher runs {sorted(self.teacher_runner.parts)} and captures {teacher_modules + teacher_methods}."
        )

    @property
    def device(self):
        return self.student.device

    @property
    def capture_targets(self) -> Dict[str, List[str]]:
        """``{"student": [...], "teacher": [...]}``: the module and method paths recorded for the heads."""
        return {
            role: list(recorder.module_targets) + list(recorder.method_targets)
            for role, recorder in (("student", self.student_recorder), ("teacher", self.teacher_recorder))
        }

    @property
    def last_step(self) -> Optional[DistillStep]:
        """What the last training forward run inside :meth:`keeping_last_step` computed; None before one."""
        return self._last_step

    @contextlib.contextmanager
    def keeping_last_step(self):
        """
        Within this context every training forward keeps what it computed in :attr:`last_step`
        (which stays readable afterwards). Off by default: a kept step holds its records, and
        with them its activations, into the next step.
        """
        self._keep_last_step = True
        try:
            yield self
        finally:
            self._keep_last_step = False

    @contextlib.contextmanager
    def paper_weights(self):
        """
        Within this context the heads' terms are not multiplied by ``DISTILL.LOSS_BALANCE`` and
        the balance observes nothing: the paper weights, as ``--check`` reports them.
        """
        self._balance_on = False
        try:
            yield self
        finally:
            self._balance_on = True

    def forward(self, batched_inputs: List[dict]):
        if not self.training:
            return self.student(batched_inputs)
        iteration = _current_iteration()
        factor = self.schedule(iteration)
        distilling = factor != 0.0 and any(iteration >= head.warmup_iters for head in self.heads.values())
        # A teacher that does not read the student's proposals runs first: its transient
        # activations are freed before the student's autograd graph exists, so the two never
        # hold memory at the same time (lower peak, better cache use on CPU).
        teacher_first = distilling and not self.teacher_runner.needs_student_records
        if teacher_first:
            teacher_records, teacher_images = self.teacher_runner(batched_inputs, None)
        with self.student_recorder.recording():
            losses = self.student(batched_inputs)
        student_records = self.student_recorder.pop()
        records = {"student": student_records}
        if not distilling:
            terms = {name: zero_terms(head, self.device) for name, head in self.heads.items()}
        else:
            if not teacher_first:
                teacher_records, teacher_images = self.teacher_runner(batched_inputs, student_records)
            records["teacher"] = teacher_records
            step = StepInputs(
                batched_inputs=batched_inputs,
                gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
                student_images=student_records.output("preprocess_image"),
                teacher_images=teacher_images,
                iteration=iteration,
            )
            terms = {
                name: head_terms(head, student_records, teacher_records, step) for name, head in self.heads.items()
            }
        # While the schedule's factor is 0 the multipliers are neither measured nor logged.
        multipliers = self._balance(terms, losses, iteration) if factor != 0.0 else {}
        for head_name, head_values in terms.items():
            for term, value in head_values.items():
                losses[_loss_key(head_name, term)] = value * (factor * multipliers.get(head_name, 1.0))
        if self._keep_last_step:
            self._last_step = DistillStep(iteration, factor, records, terms, multipliers)
        return losses

    def _balance(self, head_terms, detector_losses, iteration: int) -> Dict[str, float]:
        """
        The heads' multipliers (``DISTILL.LOSS_BALANCE``), measuring while they are not fixed yet.
        Only iterations at which every head distils are measured: a head still in its own
        warm-up has zero terms, which would fix its multiplier from nothing.
        """
        if self.loss_balance is None or self.loss_balance.mode == "off" or not self._balance_on:
            return {}
        if iteration >= self.heads_warmup_iters and self.loss_balance.observe(head_terms, detector_losses):
            logger.info(
                f"Loss balance fixed after {self.loss_balance.measure_iters} iterations with distillation on "
                f"(target {self.loss_balance.target} x the detector loss): multipliers {self.loss_balance.as_dict()}."
            )
        multipliers = self.loss_balance.applied()
        try:
            get_event_storage().put_scalars(
                **{METRIC_PREFIX + k: v for k, v in multipliers.items()}, smoothing_hint=False
            )
        except AssertionError:  # outside a trainer
            pass
        return multipliers


def _loss_key(head_name: str, term: str) -> str:
    return f"loss_kd_{head_name}" + (f"_{term}" if term else "")


def _current_iteration() -> int:
    try:
        return get_event_storage().iter
    except AssertionError:  # called outside a trainer (tests, pre-flight check)
        return 0
