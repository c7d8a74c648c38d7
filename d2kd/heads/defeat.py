"""DeFeat: decoupled foreground/background distillation (Guo et al., CVPR 2021; docs/methods/defeat.md)."""

import torch
from typing import Optional

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ..losses import kd_kl_div
from ..losses.imitation import weighted_imitation_losses
from ..modeling.box_masks import WINDOW_CONVENTIONS, canonical_box_size_for, feature_level, gt_boxes_of, level_box_masks
from ..modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .dense_outputs import is_dense_detector
from .base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead
from .roi_logits import RoILogitsMixin

__all__ = ["DeFeat"]


@DISTILL_HEAD_REGISTRY.register()
class DeFeat(RoILogitsMixin, DistillHead):
    """
    DeFeat (Guo et al., "Distilling Object Detectors via Decoupled Features", CVPR 2021;
    official code ``ggjy/DeFeat.pytorch``): foreground and background distilled separately,
    in the neck and in the RoI classification.

    **Neck** (``NECK_KD``), per FPN level ``l``: ``M_l`` is the binary union of the GT boxes
    the box-to-level rule assigns to ``l`` (five levels P2..P6 in the official code; here the
    distilled levels, the FPN level rule, Lin et al. 2017, Eq. 1), drawn with the official integer windows
    ``[floor(x1/s), floor(x2/s))`` (``MASK_CONVENTION "exclusive"``); ``psi`` is a 3x3 conv
    adapter, no activation, weights ~ N(0, 1e-4) (truncation and the conv bias's default init
    of the code not reproduced). With ``M`` repeated over the ``C`` channels::

        L_fg,l = sum M_l (psi(S_l) - T_l)^2 / max(1, 2 C sum_hw M_l)
        L_bg,l = sum (1 - M_l)(psi(S_l) - T_l)^2 / max(1, 2 C sum_hw (1 - M_l))
        L_neck = FG_WEIGHT * mean_l L_fg,l + BG_WEIGHT * mean_l L_bg,l

    (sums over the batch too). Logged per level as ``loss_kd_defeat_<level>_fg`` /
    ``_bg``, each already divided by the number of levels.

    **RoI classification** (``ROI_KD``): KL with temperature on the RoI head's ``K+1``
    logits, split into positive (foreground-labelled) and negative (background) RoIs, each
    KL summed over classes and averaged over its own RoI set (``loss_kd_defeat_roi_pos`` /
    ``_roi_neg``)::

        L_cls = POS_WEIGHT * T_pos^2 KL_pos + NEG_WEIGHT * T_neg^2 KL_neg

    The RoIs are the **student's** sampled proposals, on which the teacher's box head runs
    (d2kd's TeacherRunner) -- the code's ``SampleSTU`` mode. The official default samples the
    RoIs with the **teacher** and runs the student's RoI head on them; that mode is not
    available here. Positives are RoIs with ``gt_classes < K`` (the code's test
    ``label < label.max()`` is the same whenever a batch has a background RoI).

    Defaults: the official VOC config (``voc_stu_faster_rcnn_r50_decouple_neck.py``):
    ``hint_neck_w`` 3, ``hint_neck_back_w`` 12, ``head_cls_w`` = ``head_cls_back_w`` 2,
    ``head_cls_T`` 1. That config turns on the neck loss only; the paper's full method uses
    both parts (both on here). Published COCO weights are [UNVERIFIED]. The official runner
    also anneals every KD weight by ``1 - epoch / max_epochs`` when its config asks for it
    ("decay"); d2kd does not (not in DISTILL's schedule for this head).

    Explicit construction: ``DeFeat(pairing=FeaturePairing(student, teacher, ["p2", "p3"],
    adapter_kernel=3, adapter_init_std=1e-4), roi_kd=True, student=student, teacher=teacher)``;
    ``pairing=None`` turns the neck part off, and the models are needed (read, not kept) only
    for the RoI part.
    """

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.DEFEAT = CN()
        node.NECK_KD = True
        node.FG_WEIGHT = 3.0
        node.BG_WEIGHT = 12.0
        # Box windows of the masks: "exclusive" (official), "inclusive" or "outward".
        node.MASK_CONVENTION = "exclusive"
        # A GT box marks only its scale-assigned level (False: every level).
        node.ASSIGN_BY_SCALE = True
        # Box size of level 4 in the box-to-level rule; 0: by detector kind (224 two-stage,
        # 112 one-stage: d2kd.modeling.box_masks.canonical_box_size_for).
        node.CANONICAL_BOX_SIZE = 0
        node.ROI_KD = True
        node.POS_WEIGHT = 2.0
        node.NEG_WEIGHT = 2.0
        node.POS_TEMPERATURE = 1.0
        node.NEG_TEMPERATURE = 1.0
        add_feature_pairing_config(node, kernel_size=3, init_std=1e-4, relu=False)

    @configurable
    def __init__(
        self,
        *,
        pairing: Optional[FeaturePairing] = None,
        roi_kd: bool = True,
        student: Optional[nn.Module] = None,
        teacher: Optional[nn.Module] = None,
        fg_weight: float = 3.0,
        bg_weight: float = 12.0,
        mask_convention: str = "exclusive",
        assign_by_scale: bool = True,
        canonical_box_size: float = 0,
        pos_weight: float = 2.0,
        neg_weight: float = 2.0,
        pos_temperature: float = 1.0,
        neg_temperature: float = 1.0,
    ):
        super().__init__()
        _check_options(pairing is not None, roi_kd, mask_convention, pos_temperature, neg_temperature)
        self.neck_kd = pairing is not None
        self.roi_kd = roi_kd
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.convention = mask_convention
        self.assign_by_scale = assign_by_scale
        one_stage = student is not None and is_dense_detector(student)
        self.canonical_box_size = canonical_box_size_for(one_stage, canonical_box_size)
        self.pos_weight, self.neg_weight = pos_weight, neg_weight
        self.pos_temperature, self.neg_temperature = pos_temperature, neg_temperature
        if self.neck_kd:
            self.pairing = pairing
            self.levels = {n: feature_level(s) for n, s in self.pairing.student_strides.items()}
            self.student_modules += list(self.pairing.student_modules)
            self.teacher_modules += list(self.pairing.teacher_modules)
            self.teacher_parts.add("backbone")
        if self.roi_kd:
            self._require_roi_logits(student, teacher)
            self.num_classes = student.roi_heads.num_classes

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "pairing": feature_pairing_from_config(opts, context, cfg) if opts.NECK_KD else None,
            "roi_kd": opts.ROI_KD,
            "student": context.student,
            "teacher": context.teacher,
            "fg_weight": opts.FG_WEIGHT,
            "bg_weight": opts.BG_WEIGHT,
            "mask_convention": opts.MASK_CONVENTION,
            "assign_by_scale": opts.ASSIGN_BY_SCALE,
            "canonical_box_size": opts.CANONICAL_BOX_SIZE,
            "pos_weight": opts.POS_WEIGHT,
            "neg_weight": opts.NEG_WEIGHT,
            "pos_temperature": opts.POS_TEMPERATURE,
            "neg_temperature": opts.NEG_TEMPERATURE,
        }

    def forward(self, student, teacher, step):
        terms = {}
        if self.neck_kd:
            terms.update(self._neck_terms(student, teacher, step))
        if self.roi_kd:
            terms.update(self._roi_terms(student, teacher))
        return terms

    def _neck_terms(self, student, teacher, step):
        pairs = self.pairing.pairs(student, teacher)
        masks = level_box_masks(
            [gt_boxes_of(inst) for inst in step.gt_instances],
            self.levels,
            self.pairing.target_strides,
            {name: tuple(target.shape[-2:]) for name, _, target, _ in pairs},
            assign_by_scale=self.assign_by_scale,
            canonical_box_size=self.canonical_box_size,
            convention=self.convention,
        )
        n = len(pairs)
        terms = {}
        for name, adapted, target, _ in pairs:
            mask = masks[name].to(target.device)
            fg, bg = weighted_imitation_losses(  # one distance map for both masks
                adapted, target, [mask, 1.0 - mask], distance="l2", channel_reduction="mean", normalizer="weight_sum"
            )
            terms[f"{name}_fg"] = self.fg_weight * fg / n
            terms[f"{name}_bg"] = self.bg_weight * bg / n
        return terms

    def _roi_terms(self, student, teacher):
        student_scores, _ = self.roi_predictions(student)
        teacher_scores, _ = self.roi_predictions(teacher)
        gt_classes = torch.cat([p.gt_classes for p in self.sampled_proposals(student)])
        positive = (gt_classes >= 0) & (gt_classes < self.num_classes)
        negative = gt_classes == self.num_classes
        return {
            "roi_pos": self.pos_weight
            * kd_kl_div(student_scores[positive], teacher_scores[positive], self.pos_temperature),
            "roi_neg": self.neg_weight
            * kd_kl_div(student_scores[negative], teacher_scores[negative], self.neg_temperature),
        }


def _check_options(neck_kd, roi_kd, mask_convention, pos_temperature, neg_temperature):
    if not (neck_kd or roi_kd):
        raise DistillConfigError(
            "DISTILL.DEFEAT.NECK_KD and DISTILL.DEFEAT.ROI_KD are both False: the head would distil "
            "nothing. Turn one on or remove 'defeat' from DISTILL.HEADS."
        )
    if mask_convention not in WINDOW_CONVENTIONS:
        raise DistillConfigError(
            f"DISTILL.DEFEAT.MASK_CONVENTION {mask_convention!r} is unknown; choose one of "
            f"{WINDOW_CONVENTIONS} ('exclusive' is the official code's)."
        )
    for key, value in (("POS_TEMPERATURE", pos_temperature), ("NEG_TEMPERATURE", neg_temperature)):
        if value <= 0:
            raise DistillConfigError(f"DISTILL.DEFEAT.{key} must be > 0, got {value}.")
