"""Hinton knowledge distillation on the RoI head's class scores (methods.md 5.1)."""

from detectron2.config import CfgNode as CN

from ..losses import kd_kl_div
from .base import DISTILL_HEAD_REGISTRY, DistillHead
from .roi_logits import RoILogitsMixin

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
    """

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.KD = CN()
        cfg.DISTILL.KD.WEIGHT = 1.0
        cfg.DISTILL.KD.TEMPERATURE = 1.0

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        opts = self.options(cfg)
        if opts.TEMPERATURE <= 0:
            raise ValueError(f"DISTILL.KD.TEMPERATURE must be > 0, got {opts.TEMPERATURE}.")
        self.weight = opts.WEIGHT
        self.temperature = opts.TEMPERATURE
        self._require_roi_logits(context)

    def forward(self, student, teacher, step):
        student_scores, _ = self.roi_predictions(student)
        teacher_scores, _ = self.roi_predictions(teacher)
        return {"": self.weight * kd_kl_div(student_scores, teacher_scores, self.temperature)}
