"""
Chen et al., NIPS 2017, "Learning Efficient Object Detection Models with Knowledge
Distillation" (docs/methods/chen2017.md), on Detectron2's Faster R-CNN + FPN.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import cat
from torch import nn

from ...losses import feature_mse
from .bounded_regression import REGRESSION_NORMS, regression_distance, teacher_bounded_regression
from .weighted_soft_ce import (
    background_last_class_weights,
    binary_weighted_soft_cross_entropy,
    weighted_soft_cross_entropy,
)
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead
from ..roi_logits import RoILogitsMixin
from ..rpn_outputs import RPNOutputsMixin, check_same_anchors
from ...losses.precision import fp32

__all__ = ["Chen2017"]

STAGES = ("rpn", "rcn")
REG_MODES = ("bounded", "l2")


@DISTILL_HEAD_REGISTRY.register()
class Chen2017(RPNOutputsMixin, RoILogitsMixin, DistillHead):
    """
    Chen et al. 2017, Eq. 1::

        L = L_RPN + L_RCN + gamma * L_Hint
        L_RPN = (1/M) sum_i L_cls(i) + lambda * (1/M) sum_{j pos} L_reg(j)   (M: sampled anchors)
        L_RCN = (1/N) sum_i L_cls(i) + lambda * (1/N) sum_{j pos} L_reg(j)   (N: sampled RoIs)

    Three components, each switchable (``CLS``, ``REG``, ``HINT``); CLS and REG apply to the
    stages listed in ``STAGES`` (``"rpn"``, ``"rcn"``). Terms are logged separately as
    ``loss_kd_chen2017_<term>``:

    - ``rpn_cls`` / ``rcn_cls``: ``w_det * (1 - mu) * L_soft`` (Eq. 2-3), the class-weighted
      soft cross entropy against the teacher (``CLS.BG_WEIGHT`` on the background,
      ``CLS.TEMPERATURE``). RPN: Detectron2 has ONE sigmoid objectness logit per anchor, so the
      binary form ``-[q log s + w_bg (1-q) log(1-s)]`` with ``q = sigma(z_t/T)`` is used, on the
      student's sampled anchors (labels != -1). RCN: (K+1)-way softmax on the student's
      sampled RoIs, background = the LAST column.
    - ``rpn_cls_hard`` / ``rcn_cls_hard``: ``w_det * (mu - 1) * L_hard``, a correction of the
      detector's own hard cross entropy (``loss_rpn_cls`` / ``loss_cls``, weight ``w_det`` =
      ``MODEL.RPN.LOSS_WEIGHT`` / the box predictor's ``loss_cls`` weight), recomputed with the
      detector's normaliser, so that the total classification loss is exactly
      ``w_det * (mu * L_hard + (1 - mu) * L_soft)`` of Eq. 2. This term is <= 0 by design.
      ``mu = 1`` turns the soft term off; ``mu = 0`` cancels the hard term.
    - ``rpn_reg`` / ``rcn_reg``: ``lambda * nu * L_b`` (Eq. 4), the teacher-bounded regression
      on positive samples only: ``||R_s - y||^2`` where ``||R_s - y||^2 + m > ||R_t - y||^2``
      per sample on the whole 4-vector, else 0; only the student's term carries gradient.
      ``y``: the GT deltas from the student's ``box2box_transform`` (anchors / proposals to
      matched GT boxes); RCN uses the 4 columns of the GT class for both models. The
      detector's own smooth-L1 stays as the ``L_sL1`` of Eq. 4. ``REG.MODE "l2"`` is the
      paper's Table 4 "L2" ablation: ``||R_s - R_t||^2`` (the teacher as target).
    - ``hint_<level>``: ``gamma * mean((f(S_l) - T_l)^2)`` (Eq. 5) on each FPN level through a
      1x1 adapter ``f`` (Table 4 "Hints-A"; ``HINT.ADAPTER.ENABLED False`` is "Hints" and needs
      equal channels). Per-level mean over ``B*C*H*W`` summed over levels [UNVERIFIED: the
      paper's norm is unnormalised, on a single map; docs/methods/chen2017.md].

    Normalisers follow Detectron2's losses (docs/methods/chen2017.md): 1/M with
    ``M = RPN.BATCH_SIZE_PER_IMAGE * images`` (as ``loss_rpn_cls``/``loss_rpn_loc``), 1/N with
    N = the number of sampled RoIs (as ``loss_cls``/``loss_box_reg``).

    Unpublished values (docs/methods/chen2017.md) are options: ``CLS.MU`` (default 0.5) [UNVERIFIED:
    not given in the paper] and the margins ``REG.MARGIN_RPN`` / ``REG.MARGIN_RCN`` (default
    0, a pure bound) [UNVERIFIED: not given in the paper; m is in delta units, and Detectron2's
    RoI deltas are scaled by (10, 10, 5, 5), so the same m is ~10x looser in the RCN].
    Published: ``lambda = 1``, ``gamma = 0.5``, ``nu = 0.5``, ``w_bg = 1.5``, ``T = 1``.

    Explicit construction: ``Chen2017(student=student, teacher=teacher, stages=("rpn", "rcn"),
    hint_pairing=FeaturePairing(student, teacher, ["p2", "p3"]))``; ``hint_pairing=None`` turns
    HINT off. The models are checked and read (RPN / box predictor settings), not kept.
    """

    # An empty IN_FEATURES means the RoI heads' levels (p2..p5 on an FPN Faster R-CNN).
    LEVEL_SOURCE = "roi"

    @classmethod
    def add_config(cls, cfg):
        _C = cfg.DISTILL.CHEN2017 = CN()
        # Where CLS and REG distil: "rpn" (sampled anchors) and/or "rcn" (sampled RoIs).
        _C.STAGES = list(STAGES)
        _C.CLS = CN()
        _C.CLS.ENABLED = True
        # Weight of the hard CE in L_cls = mu*L_hard + (1-mu)*L_soft. Not published [UNVERIFIED].
        _C.CLS.MU = 0.5
        _C.CLS.TEMPERATURE = 1.0
        # Weight w_0 of the background class in L_soft (1.0 = the unweighted "CLS" ablation).
        _C.CLS.BG_WEIGHT = 1.5
        _C.REG = CN()
        _C.REG.ENABLED = True
        # "bounded": teacher-bounded L_b (Eq. 4); "l2": ||R_s - R_t|| (Table 4 "L2" ablation).
        _C.REG.MODE = "bounded"
        # Per-sample distance: "l2" (squared L2, Eq. 4) or "l1".
        _C.REG.NORM = "l2"
        # lambda: regression vs classification (Eq. 1); nu: weight of L_b in L_reg (Eq. 4).
        _C.REG.LAMBDA = 1.0
        _C.REG.NU = 0.5
        # Margins m of L_b in delta units. Not published [UNVERIFIED]; 0 = pure bound.
        _C.REG.MARGIN_RPN = 0.0
        _C.REG.MARGIN_RCN = 0.0
        _C.HINT = CN()
        _C.HINT.ENABLED = True
        # gamma (Eq. 1), chosen in the paper for an unnormalised single-map L2: tune for FPN.
        _C.HINT.GAMMA = 0.5
        # P6 is a max-pool of P5, redundant as a hint (docs/methods/chen2017.md).
        add_feature_pairing_config(_C.HINT)

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        stages: Sequence[str] = STAGES,
        cls_enabled: bool = True,
        mu: float = 0.5,
        temperature: float = 1.0,
        bg_weight: float = 1.5,
        reg_enabled: bool = True,
        reg_mode: str = "bounded",
        reg_norm: str = "l2",
        reg_lambda: float = 1.0,
        reg_nu: float = 0.5,
        margin_rpn: float = 0.0,
        margin_rcn: float = 0.0,
        hint_pairing: Optional[FeaturePairing] = None,
        gamma: float = 0.5,
        teacher_input_scale: float = 1.0,
    ):
        super().__init__()
        key = f"DISTILL.{self.config_key()}"
        _check_options(
            key,
            stages=list(stages),
            enabled={"CLS": cls_enabled, "REG": reg_enabled, "HINT": hint_pairing is not None},
            mu=mu,
            temperature=temperature,
            bg_weight=bg_weight,
            reg_mode=reg_mode,
            reg_norm=reg_norm,
            non_negative={
                "REG.LAMBDA": reg_lambda,
                "REG.NU": reg_nu,
                "REG.MARGIN_RPN": margin_rpn,
                "REG.MARGIN_RCN": margin_rcn,
                "HINT.GAMMA": gamma,
            },
        )
        self.stages = tuple(s for s in STAGES if s in stages)
        self.cls_enabled = cls_enabled and bool(self.stages)
        self.reg_enabled = reg_enabled and bool(self.stages)
        self.hint_enabled = hint_pairing is not None
        self.mu = mu
        self.temperature = temperature
        self.bg_weight = bg_weight
        self.reg_mode = reg_mode
        self.reg_norm = reg_norm
        self.reg_weight = reg_lambda * reg_nu
        self.margins = {"rpn": margin_rpn, "rcn": margin_rcn}

        uses_outputs = self.cls_enabled or self.reg_enabled
        if uses_outputs and "rpn" in self.stages:
            self._require_rpn_outputs(student, teacher, teacher_input_scale)
            if self.reg_enabled:
                _check_same_transform(
                    self.name, "RPN", student.proposal_generator, teacher.proposal_generator, "MODEL.RPN.BBOX_REG_WEIGHTS"
                )
            rpn = student.proposal_generator
            self.rpn_normalizer_per_image = rpn.batch_size_per_image
            self.rpn_cls_weight = rpn.loss_weight.get("loss_rpn_cls", 1.0)
            self.rpn_transform = rpn.box2box_transform
            self.rpn_box_dim = rpn.anchor_generator.box_dim
        if uses_outputs and "rcn" in self.stages:
            self._require_roi_logits(student, teacher)
            if self.cls_enabled:
                _check_softmax_classifiers(key, student, teacher)
            if self.reg_enabled:
                _check_same_transform(
                    self.name,
                    "RoI box",
                    student.roi_heads.box_predictor,
                    teacher.roi_heads.box_predictor,
                    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS",
                )
            predictor = student.roi_heads.box_predictor
            self.num_classes = student.roi_heads.num_classes
            loss_weight = predictor.loss_weight
            self.rcn_cls_weight = loss_weight.get("loss_cls", 1.0) if isinstance(loss_weight, dict) else loss_weight
            self.rcn_transform = predictor.box2box_transform
        self.pairing = None
        if self.hint_enabled:
            self.pairing = hint_pairing
            self.student_modules += list(self.pairing.student_modules)
            self.teacher_modules += list(self.pairing.teacher_modules)
            self.teacher_parts.add("backbone")
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {
            "student": context.student,
            "teacher": context.teacher,
            "stages": list(opts.STAGES),
            "cls_enabled": opts.CLS.ENABLED,
            "mu": opts.CLS.MU,
            "temperature": opts.CLS.TEMPERATURE,
            "bg_weight": opts.CLS.BG_WEIGHT,
            "reg_enabled": opts.REG.ENABLED,
            "reg_mode": opts.REG.MODE,
            "reg_norm": opts.REG.NORM,
            "reg_lambda": opts.REG.LAMBDA,
            "reg_nu": opts.REG.NU,
            "margin_rpn": opts.REG.MARGIN_RPN,
            "margin_rcn": opts.REG.MARGIN_RCN,
            "hint_pairing": feature_pairing_from_config(opts.HINT, context, cfg) if opts.HINT.ENABLED else None,
            "gamma": opts.HINT.GAMMA,
            "teacher_input_scale": cfg.DISTILL.TEACHER.INPUT_SCALE,
        }

    # ------------------------------------------------------------------------------------
    def forward(self, student, teacher, step):
        terms = {}
        if self.cls_enabled or self.reg_enabled:
            if "rpn" in self.stages:
                terms.update(self._rpn_terms(student, teacher))
            if "rcn" in self.stages:
                terms.update(self._rcn_terms(student, teacher))
        if self.hint_enabled:
            for level, adapted, target, _ in self.pairing.pairs(student, teacher):
                terms[f"hint_{level}"] = self.gamma * feature_mse(adapted, target)
        return terms

    def _rpn_terms(self, student, teacher):
        s_logits, s_deltas = self.rpn_predictions(student, self.rpn_box_dim)
        t_logits, t_deltas = self.rpn_predictions(teacher, self.rpn_box_dim)
        check_same_anchors(self.name, "RPN", s_logits, t_logits)
        sampled = self.sampled_anchors(student)
        normalizer = self.rpn_normalizer_per_image * s_logits.shape[0]
        terms = {}
        if self.cls_enabled:
            mask = sampled.sampled
            z_s = s_logits[mask]
            soft = binary_weighted_soft_cross_entropy(
                z_s, t_logits[mask], 1.0, self.bg_weight, self.temperature
            ).sum() / normalizer
            labels = sampled.labels[mask].to(z_s.dtype)
            hard = F.binary_cross_entropy_with_logits(fp32(z_s), fp32(labels), reduction="sum") / normalizer
            terms["rpn_cls"] = self.rpn_cls_weight * (1.0 - self.mu) * soft
            terms["rpn_cls_hard"] = self.rpn_cls_weight * (self.mu - 1.0) * hard
        if self.reg_enabled:
            pos = sampled.positive
            anchors = sampled.anchors.unsqueeze(0).expand_as(sampled.matched_gt_boxes)[pos]
            gt_deltas = self.rpn_transform.get_deltas(anchors, sampled.matched_gt_boxes[pos])
            loss = self._regression(s_deltas[pos], t_deltas[pos], gt_deltas, self.margins["rpn"])
            terms["rpn_reg"] = self.reg_weight * loss / normalizer
        return terms

    def _rcn_terms(self, student, teacher):
        s_scores, s_deltas = self.roi_predictions(student)
        t_scores, t_deltas = self.roi_predictions(teacher)
        proposals = self.sampled_proposals(student)
        gt_classes = cat([p.gt_classes for p in proposals], dim=0)
        normalizer = max(gt_classes.numel(), 1)
        terms = {}
        if self.cls_enabled:
            weights = background_last_class_weights(self.num_classes, self.bg_weight, device=s_scores.device)
            soft = weighted_soft_cross_entropy(s_scores, t_scores, weights, self.temperature).sum() / normalizer
            hard = F.cross_entropy(fp32(s_scores), gt_classes, reduction="sum") / normalizer
            terms["rcn_cls"] = self.rcn_cls_weight * (1.0 - self.mu) * soft
            terms["rcn_cls_hard"] = self.rcn_cls_weight * (self.mu - 1.0) * hard
        if self.reg_enabled:
            fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            # Images without GT boxes have no "gt_boxes" and only background RoIs (as in Detectron2).
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0)
            gt_deltas = self.rcn_transform.get_deltas(proposal_boxes[fg], gt_boxes[fg])
            fg_classes = gt_classes[fg]
            s_fg = _class_deltas(s_deltas[fg], fg_classes)
            t_fg = _class_deltas(t_deltas[fg], fg_classes)
            loss = self._regression(s_fg, t_fg, gt_deltas, self.margins["rcn"])
            terms["rcn_reg"] = self.reg_weight * loss / normalizer
        return terms

    def _regression(self, student_deltas, teacher_deltas, gt_deltas, margin) -> torch.Tensor:
        """Sum over the given (positive) samples of L_b, or of ||R_s - R_t|| in "l2" mode."""
        if self.reg_mode == "bounded":
            per_sample = teacher_bounded_regression(student_deltas, teacher_deltas, gt_deltas, margin, self.reg_norm)
        else:
            per_sample = regression_distance(student_deltas, teacher_deltas.detach(), self.reg_norm)
        return per_sample.sum()


def _check_options(key, *, stages, enabled, mu, temperature, bg_weight, reg_mode, reg_norm, non_negative):
    """The option values of :class:`Chen2017`, each error naming its key under ``key``
    (``enabled``: CLS, REG and HINT on or off; ``non_negative``: values by their key)."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise DistillConfigError(f"{key}.STAGES has unknown entries {unknown}; use a subset of {list(STAGES)}.")
    if not any(enabled.values()):
        raise DistillConfigError(f"{key}: CLS, REG and HINT are all disabled; enable at least one.")
    if (enabled["CLS"] or enabled["REG"]) and not stages:
        raise DistillConfigError(
            f"{key}.STAGES is empty but CLS or REG is enabled; list 'rpn' and/or 'rcn', or disable them."
        )
    if not 0.0 <= mu <= 1.0:
        raise DistillConfigError(f"{key}.CLS.MU must be in [0, 1] (hard-label share), got {mu}.")
    if temperature <= 0:
        raise DistillConfigError(f"{key}.CLS.TEMPERATURE must be > 0, got {temperature}.")
    if bg_weight < 0:
        raise DistillConfigError(f"{key}.CLS.BG_WEIGHT must be >= 0, got {bg_weight}.")
    if reg_mode not in REG_MODES:
        raise DistillConfigError(f"{key}.REG.MODE must be one of {list(REG_MODES)}, got '{reg_mode}'.")
    if reg_norm not in REGRESSION_NORMS:
        raise DistillConfigError(f"{key}.REG.NORM must be one of {list(REGRESSION_NORMS)}, got '{reg_norm}'.")
    for name, value in non_negative.items():
        if value < 0:
            raise DistillConfigError(f"{key}.{name} must be >= 0, got {value}.")


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor, box_dim: int = 4) -> torch.Tensor:
    """The ``box_dim`` columns of each row's class (class-specific) or the only ones (agnostic)."""
    if deltas.shape[1] == box_dim:
        return deltas
    rows = torch.arange(deltas.shape[0], device=deltas.device)
    return deltas.view(deltas.shape[0], deltas.shape[1] // box_dim, box_dim)[rows, classes]


def _check_softmax_classifiers(key, student, teacher):
    for role, model in (("student", student), ("teacher", teacher)):
        if getattr(model.roi_heads.box_predictor, "use_sigmoid_ce", False):
            raise DistillConfigError(
                f"{key}.CLS distils a (K+1)-way softmax, but the {role}'s box predictor uses "
                "sigmoid cross entropy (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE). Set it False, or "
                f"remove 'rcn' from {key}.STAGES / set {key}.CLS.ENABLED False."
            )


def _check_same_transform(head_name, what, student_module, teacher_module, option):
    s_weights = tuple(student_module.box2box_transform.weights)
    t_weights = tuple(teacher_module.box2box_transform.weights)
    if s_weights != t_weights:
        raise DistillConfigError(
            f"Head '{head_name}' compares {what} deltas, but the student encodes them with weights {s_weights} "
            f"and the teacher with {t_weights}. Use the same {option} in both configs, or turn REG off."
        )
