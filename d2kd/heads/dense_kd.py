"""Hinton KD on a one-stage detector's sigmoid class logits (docs/methods/dense_kd.md)."""

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ..losses import binary_kd_div
from ..losses.sigmoid_kd import BINARY_KD_FORMS
from .base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead
from .dense_outputs import DenseOutputsMixin
from ..losses.precision import fp32

__all__ = ["DenseKD"]

NORMALIZERS = ("num_pos", "num_anchors")


@DISTILL_HEAD_REGISTRY.register()
class DenseKD(DenseOutputsMixin, DistillHead):
    """
    Soft-label distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural
    Network", Sec. 2) of a RetinaNet's dense classification head, anchor by anchor, with the
    per-class **binary** form that suits sigmoid logits (docs/methods/dense_kd.md; never a softmax over
    sigmoid logits, the pitfall of docs/methods/gkd.md)::

        L = WEIGHT * (1/Z) * sum_{n, a, k} T^2 * BCE( sigmoid(z_s/T), sigmoid(z_t/T) ) [* |p - q|^gamma]

    - ``a`` runs over every anchor of every level (the teacher's soft label is meaningful on
      ignored and background anchors too, so all are used); ``k`` over the K classes.
    - ``Z`` (``NORMALIZER``): ``"num_pos"`` = the number of positive anchors in the batch
      (the student's own ``label_anchors`` matching, at least 1), as the focal loss normalises
      (Detectron2 additionally smooths it with an EMA; this head uses the batch count, per
      process); ``"num_anchors"`` = the number of anchors (a mean over anchors).
    - ``FORM``: ``"kl"`` subtracts the teacher's binary entropy, so a student equal to the
      teacher costs zero; ``"bce"`` is the literal cross entropy. Same gradient.
    - ``FOCAL_GAMMA`` > 0 multiplies each term by ``|sigmoid(z_s/T) - sigmoid(z_t/T)|^gamma``
      (the "focal-style weight" of docs/methods/dense_kd.md, in the form of Quality Focal Loss, Li et al.
      2020, Eq. 5). The exact weight is [UNVERIFIED]: a design choice; 0 (default) = off.

    Logged per level of the student's ``head_in_features`` (``loss_kd_densekd_p3`` ...);
    the levels sum to ``L``. Teacher and student must have the same classes, levels, anchors
    and input resolution (checked at build time). Box-delta distillation is not included.

    Explicit construction: ``DenseKD(student=student, teacher=teacher, temperature=1.0,
    form="kl", normalizer="num_pos")`` (the models are checked and read, not kept).
    """

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.DENSEKD = CN()
        cfg.DISTILL.DENSEKD.WEIGHT = 1.0
        cfg.DISTILL.DENSEKD.TEMPERATURE = 1.0
        # "kl" (binary KL: zero at a perfect match) or "bce" (binary cross entropy); same gradient.
        cfg.DISTILL.DENSEKD.FORM = "kl"
        # "num_pos" (positive anchors in the batch, as focal loss) or "num_anchors" (mean).
        cfg.DISTILL.DENSEKD.NORMALIZER = "num_pos"
        # |p_s - p_t|^gamma weight on each term; 0 = off [UNVERIFIED design choice].
        cfg.DISTILL.DENSEKD.FOCAL_GAMMA = 0.0

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        temperature: float = 1.0,
        form: str = "kl",
        normalizer: str = "num_pos",
        focal_gamma: float = 0.0,
        teacher_input_scale: float = 1.0,
    ):
        super().__init__()
        problems = []
        if temperature <= 0:
            problems.append(f"TEMPERATURE must be > 0, got {temperature}")
        if form not in BINARY_KD_FORMS:
            problems.append(f"FORM must be one of {list(BINARY_KD_FORMS)}, got '{form}'")
        if normalizer not in NORMALIZERS:
            problems.append(f"NORMALIZER must be one of {list(NORMALIZERS)}, got '{normalizer}'")
        if focal_gamma < 0:
            problems.append(f"FOCAL_GAMMA must be >= 0, got {focal_gamma}")
        if problems:
            raise DistillConfigError("Invalid DISTILL.DENSEKD options: " + "; ".join(problems) + ".")
        self.weight = weight
        self.temperature = temperature
        self.form = form
        self.normalizer = normalizer
        self.gamma = focal_gamma
        self.needs_aligned_classes = True
        self._require_dense_outputs(student, teacher, teacher_input_scale, anchor_labels=self.normalizer == "num_pos")

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "student": context.student,
            "teacher": context.teacher,
            "weight": opts.WEIGHT,
            "temperature": opts.TEMPERATURE,
            "form": opts.FORM,
            "normalizer": opts.NORMALIZER,
            "focal_gamma": opts.FOCAL_GAMMA,
            "teacher_input_scale": cfg.DISTILL.TEACHER.INPUT_SCALE,
        }

    def forward(self, student, teacher, step):
        s_logits, t_logits = self.paired_dense_logits(student, teacher)
        terms = binary_kd_div(s_logits, t_logits, self.temperature, self.form)
        if self.gamma > 0:
            t = self.temperature
            gap = (torch.sigmoid(fp32(s_logits) / t) - torch.sigmoid(fp32(t_logits.detach()) / t)).abs()
            terms = terms * gap.pow(self.gamma)
        if self.normalizer == "num_pos":
            labels = self.anchor_labels(student)
            positives = ((labels >= 0) & (labels != self.num_classes)).sum()
            z = positives.clamp(min=1).to(terms.dtype)
        else:
            z = float(s_logits.shape[0] * s_logits.shape[1])
        per_level = terms.split(self.dense_level_sizes(student), dim=1)
        return {level: self.weight * part.sum() / z for level, part in zip(self.dense_levels, per_level)}
