"""
The module the trainer optimises: the student plus the distillation heads.

The teacher is held by reference and is **not** a submodule, so it is not in the
state_dict, the optimizer or the DDP wrapper, and ``train()`` never reaches it. In eval
mode the module is exactly the student.
"""

import logging
from typing import Dict, List, Optional

import torch
from detectron2.utils.events import get_event_storage
from torch import nn

from ..capture import Recorder
from ..step import StepInputs
from .loss_balance import METRIC_PREFIX, LossBalance
from .schedule import DistillSchedule
from .teacher import TeacherRunner

__all__ = ["DistillationModel"]

logger = logging.getLogger(__name__)


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
        # The first iteration at which every head distils: heads with a warm-up of their own (FGFI's)
        # return zero terms before it, so DISTILL.LOSS_BALANCE measures from here and --check steps here.
        self.heads_warmup_iters = max((head.warmup_iters for head in heads.values()), default=0)
        self.schedule = schedule
        self.loss_balance = loss_balance
        object.__setattr__(self, "teacher", teacher)  # not registered as a submodule

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

    def forward(self, batched_inputs: List[dict]):
        if not self.training:
            return self.student(batched_inputs)
        iteration = _current_iteration()
        factor = self.schedule(iteration)
        # A teacher that does not read the student's proposals runs first: its transient
        # activations are freed before the student's autograd graph exists, so the two never
        # hold memory at the same time (lower peak, better cache use on CPU).
        teacher_first = factor != 0.0 and not self.teacher_runner.needs_student_records
        if teacher_first:
            teacher_records, teacher_images = self.teacher_runner(batched_inputs, None)
        with self.student_recorder.recording():
            losses = self.student(batched_inputs)
        student_records = self.student_recorder.pop()
        if factor == 0.0:
            losses.update(self._inactive_terms())
            return losses
        if not teacher_first:
            teacher_records, teacher_images = self.teacher_runner(batched_inputs, student_records)
        step = StepInputs(
            batched_inputs=batched_inputs,
            gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
            student_images=student_records.output("preprocess_image"),
            teacher_images=teacher_images,
            iteration=iteration,
        )
        head_terms = {name: head(student_records, teacher_records, step) for name, head in self.heads.items()}
        multipliers = self._balance(head_terms, losses, iteration)
        for head_name, terms in head_terms.items():
            for term, value in terms.items():
                losses[_loss_key(head_name, term)] = value * (factor * multipliers.get(head_name, 1.0))
        return losses

    def _balance(self, head_terms, detector_losses, iteration: int) -> Dict[str, float]:
        """
        The heads' multipliers (``DISTILL.LOSS_BALANCE``), measuring while they are not fixed yet.
        Only iterations at which every head distils are measured: a head still in its own
        warm-up (FGFI's ``WARMUP_ITERS``) returns zero terms, which would fix its multiplier
        from nothing.
        """
        if self.loss_balance is None or self.loss_balance.mode == "off":
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

    def _inactive_terms(self) -> Dict[str, torch.Tensor]:
        """
        Zero terms while distillation is off (warm-up, after STOP_ITER). They touch every
        trainable head parameter so DDP sees the same parameters used at every step and
        needs no ``find_unused_parameters``.
        """
        terms = {}
        for head_name, head in self.heads.items():
            params = [p for p in head.parameters() if p.requires_grad]
            zero = sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.device))
            terms[_loss_key(head_name, "")] = zero
        return terms


def _loss_key(head_name: str, term: str) -> str:
    return f"loss_kd_{head_name}" + (f"_{term}" if term else "")


def _current_iteration() -> int:
    try:
        return get_event_storage().iter
    except AssertionError:  # called outside a trainer (tests, pre-flight check)
        return 0
