"""FGFI: fine-grained feature imitation near objects (Wang et al., CVPR 2019; docs/methods/fgfi.md)."""

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ...losses.imitation import weighted_imitation_loss
from ...modeling.box_masks import (
    assign_boxes_to_levels,
    canonical_box_size_for,
    feature_level,
    gt_boxes_of,
    resize_mask,
)
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .imitation_mask import anchor_source, imitation_mask
from ..dense_outputs import is_dense_detector
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead

__all__ = ["FGFI"]


@DISTILL_HEAD_REGISTRY.register()
class FGFI(DistillHead):
    """
    Fine-grained feature imitation (Wang et al., "Distilling Object Detectors with
    Fine-grained Feature Imitation", CVPR 2019; official code ``twangnh/Distilling-Object-
    Detectors``), extended to FPN levels.

    Imitation mask (Sec. 3.1): on each level, with the **student's** anchors of that level
    (the recorded output of its anchor generator), a GT box ``g`` marks every location where
    some anchor has ``IoU > PSI * max IoU_g`` (:func:`d2kd.heads.fgfi.imitation_mask.
    imitation_mask`); ``I`` is the union over GT boxes. Loss (Eq. 4), per level::

        L_l = sum_{b,h,w} I_{b,h,w} sum_c (f(S)_{b,c,h,w} - T_{b,c,h,w})^2 / (2 N_p),
        N_p = sum_{b,h,w} I_{b,h,w}   (positions, not x C; a zero mask gives 0)

    with ``f`` a 3x3 conv + ReLU adapter, weights ~ N(0, 1e-4) (the code's ``fmod``-truncated
    normal is not reproduced; at std 1e-4 the difference is immaterial). Each level's term
    ``WEIGHT * L_l / n_levels`` is logged as ``loss_kd_fgfi_<level>``; their sum is the
    average over levels times ``WEIGHT`` (lambda = 0.01, Eq. 5).

    FPN extension (a reimplementation choice, not in the paper, which uses a single C4/VGG
    map): with ``ASSIGN_BY_SCALE`` a GT box only contributes on the level the box-to-level
    rule (the FPN level rule, Lin et al. 2017, Eq. 1, clamped to the distilled levels, ``CANONICAL_BOX_SIZE`` <-> level 4)
    assigns it to, as DeFeat's FGFI reimplementation; False uses every box on every level.

    Warm-up: the official code skips imitation for its first 400 iterations (at batch 1):
    ``WARMUP_ITERS`` (the head's ``warmup_iters``, on top of ``DISTILL.WARMUP_ITERS``), during
    which the distillation model gives the head zero terms.

    Differences to note: the ReLU after the adapter follows the paper (VGG features are
    post-ReLU, hence non-negative); FPN outputs are signed, so a ReLU adapter cannot match
    negative teacher values (DeFeat's FGFI-on-FPN reimplementation drops it:
    ``ADAPTER.RELU False``). IoUs use Detectron2's ``pairwise_iou`` (no +1 in widths).

    Explicit construction: ``FGFI(student=student, pairing=FeaturePairing(student, teacher,
    ["p2", "p3"], adapter_kernel=3, adapter_init_std=1e-4, adapter_relu=True), weight=0.01)``
    (the student is read for its anchor generator, not kept).
    """

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.FGFI = CN()
        node.WEIGHT = 0.01
        # Threshold factor psi: F_g = PSI * (max IoU of g over the level's anchors).
        node.PSI = 0.5
        # FGFI's own warm-up: no imitation before this iteration (the code: 400).
        node.WARMUP_ITERS = 400
        # FPN extension: a GT box contributes only on its scale-assigned level.
        node.ASSIGN_BY_SCALE = True
        # Box size of level 4 in the box-to-level rule; 0: by detector kind (224 two-stage,
        # 112 one-stage: d2kd.modeling.box_masks.canonical_box_size_for).
        node.CANONICAL_BOX_SIZE = 0
        # No ReLU after the adapter: FPN features are signed, and a ReLU would keep the masked
        # loss above the teacher's negative part (the paper's C4 features were post-ReLU).
        add_feature_pairing_config(node, kernel_size=3, init_std=1e-4, relu=False)

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        pairing: FeaturePairing,
        weight: float = 0.01,
        psi: float = 0.5,
        warmup_iters: int = 400,
        assign_by_scale: bool = True,
        canonical_box_size: float = 0,
    ):
        super().__init__()
        _check_options(psi, warmup_iters)
        self.anchor_path, anchor_features = _anchor_source(student, pairing.names)
        self.weight = weight
        self.psi = psi
        self.assign_by_scale = assign_by_scale
        self.canonical_box_size = canonical_box_size_for(is_dense_detector(student), canonical_box_size)
        self.warmup_iters = int(warmup_iters)  # the distiller gives zero terms before it (DistillHead)
        self.pairing = pairing
        self.anchor_index = {n: anchor_features.index(n) for n in self.pairing.names}
        self.levels = {n: feature_level(s) for n, s in self.pairing.student_strides.items()}
        self.capture_pairing(self.pairing, [self.anchor_path])

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "student": context.student,
            "pairing": feature_pairing_from_config(opts, context, cfg),
            "weight": opts.WEIGHT,
            "psi": opts.PSI,
            "warmup_iters": opts.WARMUP_ITERS,
            "assign_by_scale": opts.ASSIGN_BY_SCALE,
            "canonical_box_size": opts.CANONICAL_BOX_SIZE,
        }

    def forward(self, student, teacher, step):
        names = self.pairing.names
        anchors = student.output(self.anchor_path)
        gt_boxes = [gt_boxes_of(inst) for inst in step.gt_instances]
        lo, hi = min(self.levels.values()), max(self.levels.values())
        box_levels = [assign_boxes_to_levels(b, lo, hi, self.canonical_box_size) for b in gt_boxes]
        terms = {}
        for name, adapted, target, raw in self.pairing.pairs(student, teacher):
            level_anchors = anchors[self.anchor_index[name]].tensor
            masks = []
            for boxes, levels in zip(gt_boxes, box_levels):
                if self.assign_by_scale:
                    boxes = boxes[levels == self.levels[name]]
                masks.append(imitation_mask(level_anchors, boxes, raw.shape[-2:], self.psi))
            mask = resize_mask(torch.stack(masks), target.shape[-2:])
            loss = weighted_imitation_loss(
                adapted, target, mask, distance="l2", channel_reduction="sum", normalizer="weight_sum", half=True
            )
            terms[name] = self.weight * loss / len(names)
        return terms



def _check_options(psi, warmup_iters):
    if not 0.0 < psi <= 1.0:
        raise DistillConfigError(f"DISTILL.FGFI.PSI must be in (0, 1], got {psi} (the paper uses 0.5).")
    if warmup_iters < 0:
        raise DistillConfigError(f"DISTILL.FGFI.WARMUP_ITERS must be >= 0, got {warmup_iters}.")


def _anchor_source(student, in_features):
    """``(anchor generator path, its features)`` of the student, which must cover ``in_features``."""
    source = anchor_source(student)
    if source is None:
        raise DistillConfigError(
            f"FGFI builds its imitation mask from the student's anchors, but the student "
            f"({type(student).__name__}) has no anchor generator (RPN or dense head). "
            "Use an anchor-based detector or a mask-free feature head (e.g. fitnet)."
        )
    anchor_path, anchor_features = source
    missing = [n for n in in_features if n not in anchor_features]
    if missing:
        raise DistillConfigError(
            f"DISTILL.FGFI.IN_FEATURES {list(in_features)}: {missing} carry no anchors; the "
            f"student's anchor generator runs on {anchor_features}. Choose features among those."
        )
    return anchor_path, anchor_features
