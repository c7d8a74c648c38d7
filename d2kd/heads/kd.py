"""Hinton knowledge distillation on the RoI head's class scores (docs/methods/kd.md)."""

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ..losses import kd_kl_div
from .base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead
from .roi_logits import BOX_PREDICTOR, RoILogitsMixin

__all__ = ["KD"]


@DISTILL_HEAD_REGISTRY.register()
class KD(RoILogitsMixin, DistillHead):
    """
    Soft-label distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
    Network", Sec. 2) on the (K+1)-way RoI classification logits::

        L_KD = WEIGHT * T^2 * KL( softmax(z_t/T) || softmax(z_s/T) ),  mean over sampled RoIs

    The teacher's box head runs on the student's sampled RoIs. The hard loss stays the
    detector's own ``loss_cls``. ``TEMPERATURE`` defaults to 1: Chen et al. 2017 found no
    temperature best for detection; classification work uses 2-4.

    ``CLASSIFIER_ONLY`` (a diagnostic, not in the paper; default off): the student's logits
    are recomputed from its box-head features with the gradient stopped, so the KD term
    trains only the class-score layer (``box_predictor.cls_score``), not the box head's
    shared FC layers or the backbone that the box regressor also depends on.

    Explicit construction: ``KD(student=student, teacher=teacher, weight=1.0, temperature=1.0)``;
    the models are checked and read (``CLASSIFIER_ONLY``: the student's ``cls_score``), not kept.
    """

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.KD = CN()
        cfg.DISTILL.KD.WEIGHT = 1.0
        cfg.DISTILL.KD.TEMPERATURE = 1.0
        cfg.DISTILL.KD.CLASSIFIER_ONLY = False

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        temperature: float = 1.0,
        classifier_only: bool = False,
    ):
        super().__init__()
        if temperature <= 0:
            raise DistillConfigError(f"DISTILL.KD.TEMPERATURE must be > 0, got {temperature}.")
        self.weight = weight
        self.temperature = temperature
        self._require_roi_logits(student, teacher)
        self._student_class_scores = None
        if classifier_only:
            cls_score = getattr(student.roi_heads.box_predictor, "cls_score", None)
            if not isinstance(cls_score, nn.Linear):
                raise DistillConfigError(
                    "DISTILL.KD.CLASSIFIER_ONLY recomputes the student's class scores with its "
                    "box_predictor.cls_score linear layer, which this student "
                    f"({type(student.roi_heads.box_predictor).__name__}) does not have; "
                    "set DISTILL.KD.CLASSIFIER_ONLY False."
                )
            # A bound method, not a submodule: the head must not own or checkpoint the layer.
            self._student_class_scores = cls_score.forward

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "student": context.student,
            "teacher": context.teacher,
            "weight": opts.WEIGHT,
            "temperature": opts.TEMPERATURE,
            "classifier_only": opts.CLASSIFIER_ONLY,
        }

    def forward(self, student, teacher, step):
        if self._student_class_scores is None:
            student_scores, _ = self.roi_predictions(student)
        else:
            box_features = student.inputs(BOX_PREDICTOR)[0]
            student_scores = self._student_class_scores(torch.flatten(box_features, 1).detach())
        teacher_scores, _ = self.roi_predictions(teacher)
        return {"": self.weight * kd_kl_div(student_scores, teacher_scores, self.temperature)}
