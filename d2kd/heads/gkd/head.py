"""Global Knowledge distillation: prototypes (PGM) + robust distillation (RDM) (docs/methods/gkd.md).

Two-stage (FPN Faster R-CNN) and one-stage (RetinaNet) students; see :class:`GKD`."""

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling.poolers import assign_boxes_to_levels as pooler_levels
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import nn

from ...losses import binary_kd_div, kd_kl_div
from ...losses.imitation import weighted_imitation_loss, weighted_imitation_losses
from ...modeling.box_masks import assign_boxes_to_levels, box_value_mask, canonical_box_size_for, gt_boxes_of
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .prototypes import box_average_pool, cosine_projection, mp_projection, robust_weights
from ...modeling.schedule import DistillSchedule
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead
from ..dense_outputs import DenseOutputsMixin, is_dense_detector
from ..roi_logits import SAMPLED_PROPOSALS, RoILogitsMixin

__all__ = ["GKD", "global_knowledge_loss", "decoupled_feature_loss", "response_loss"]

BOX_POOLER = "roi_heads.box_pooler"
PROJECTIONS = ("cosine", "mp")
# Response divergence on a one-stage detector's sigmoid class logits.
ANCHOR_KL_FORMS = ("binary", "softmax")
# Prototype generation (PGM) options, ``DISTILL.GKD.PGM``, with their defaults.
PGM_DEFAULTS = {
    "NUM_PROTOTYPES": 10,  # K per class and level
    "ALPHA": 10.0,  # TS-consistency weight of Eq. 2
    "PERIOD": 0,  # iterations between updates; 0 = one epoch
    "MAX_IMAGES_PER_CLASS": 800,
    # Boxes must be wider and taller than this (pixels of the test-time input).
    "MIN_BOX_SIZE": 30.0,
    "DENSITY_KERNEL": 0.1,
    "DENSITY_PERCENTILE": 40.0,
    "SEED": 1,
}


def global_knowledge_loss(
    student_feats: torch.Tensor,
    teacher_feats: torch.Tensor,
    student_prototypes: torch.Tensor,
    teacher_prototypes: torch.Tensor,
    weights: torch.Tensor,
    projection: str = "cosine",
    alpha: float = 10.0,
) -> torch.Tensor:
    """
    Eq. 6 at one level, as the code computes it (``r2i_om_loss``)::

        mean_{i,k} SmoothL1_{beta=1}( w_i * phi_s,ik , w_i * phi_t,ik )

    over the N instances (rows of ``student_feats``/``teacher_feats``) and ALL prototypes of
    the level ``(K_tot, D)``. ``phi`` are cosines (``projection="cosine"``, the code) or the
    Eq. 5 coefficients (``"mp"``, see :func:`~d2kd.heads.gkd.prototypes.mp_projection`,
    [UNVERIFIED]). ``w`` (Eq. 8) multiplies both arguments, as in the code. Teacher side and
    weights are detached; no instance or no prototype gives a zero that keeps the graph.
    """
    if len(student_feats) == 0 or len(student_prototypes) == 0:
        return student_feats.sum() * 0.0
    cos_s = cosine_projection(student_feats, student_prototypes)
    with torch.no_grad():
        cos_t = cosine_projection(teacher_feats, teacher_prototypes)
    if projection == "cosine":
        phi_s, phi_t = cos_s, cos_t
    elif projection == "mp":
        phi_t, _ = mp_projection(cos_t, cos_s.detach(), alpha)
        _, phi_s = mp_projection(cos_t, cos_s, alpha)
    else:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    w = weights.detach().to(phi_s.dtype)[:, None]
    return F.smooth_l1_loss(w * phi_s, w * phi_t, beta=1.0, reduction="mean")


def decoupled_feature_loss(
    adapted: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, fg_weight: float = 1.0, bg_weight: float = 0.0
) -> torch.Tensor:
    """
    Eq. 7 at one level in the code's decoupled form (``KDLoss``, docs/methods/gkd.md)::

        L_fg = sum (psi(S) - T)^2 M / (2 C sum M),   L_bg = sum (psi(S) - T)^2 (1 - M1) / (2 C sum (1 - M1))
        fg_weight * L_fg + bg_weight * L_bg,          M1 = [M > 0]

    ``mask`` ``(B, H, W)`` is the real-valued robust-weight mask (the code repeats it over
    the C channels, hence the ``C`` in the normalisers). The code clamps the normalisers to
    ``max(1, .)``; here an all-zero mask gives 0 and otherwise the two agree whenever
    ``2 C sum M >= 1`` (always, unless all weights are below ``1 / (2C)``).
    """
    if not bg_weight:
        return fg_weight * weighted_imitation_loss(adapted, teacher, mask, "l2", "mean", "weight_sum", half=True)
    background = (mask <= 0).to(adapted.dtype)
    fg, bg = weighted_imitation_losses(adapted, teacher, [mask, background], "l2", "mean", "weight_sum", half=True)
    return fg_weight * fg + bg_weight * bg


def response_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 2.0,
    divergence: str = "softmax",
    class_mean: bool = False,
) -> torch.Tensor:
    """
    The local response term (docs/methods/gkd.md) on R distilled rows -- the positive RoIs of
    a two-stage detector or the positive anchors of a one-stage one -- with ``C`` logits each::

        L = (1/R) sum_r w_r * D_r,     D_r = T^2 * div_r  [/ C if class_mean]

    - ``divergence="softmax"``: ``div_r = KL(softmax(z_t/T) || softmax(z_s/T))`` over the C
      columns (:func:`~d2kd.losses.kd_kl_div`; the RoI head's K+1 logits, and the released
      code's choice on RetinaNet's K sigmoid logits);
    - ``"binary"``: ``div_r = sum_c KL(Bern(sigmoid(z_t,c/T)) || Bern(sigmoid(z_s,c/T)))``, the
      per-class binary KL that suits sigmoid logits (:func:`~d2kd.losses.binary_kd_div`).

    ``class_mean`` divides by C (the code's ``kl_div(reduction='none').mean(1)``). ``weights``
    ``(R,)`` are the detached Eq. 8 robust weights (``None``: 1). ``1/R`` is the number of rows
    of the batch: positive RoIs, or positive anchors as RetinaNet's focal loss normalises. No
    row gives a zero that keeps the graph.
    """
    if divergence == "binary":
        rows = binary_kd_div(student_logits, teacher_logits, temperature, "kl").sum(dim=1)
    elif divergence == "softmax":
        rows = kd_kl_div(student_logits, teacher_logits, temperature, reduction="none")
    else:
        raise ValueError(f"divergence must be 'softmax' or 'binary', got {divergence!r}")
    if class_mean:
        rows = rows / student_logits.shape[1]
    if weights is not None:
        if weights.shape != rows.shape:
            raise ValueError(f"weights must be one per row, shape {tuple(rows.shape)}; got {tuple(weights.shape)}.")
        rows = rows * weights.detach().to(rows.dtype)
    if len(rows) == 0:
        return student_logits.sum() * 0.0
    return rows.mean()


@DISTILL_HEAD_REGISTRY.register()
class GKD(RoILogitsMixin, DenseOutputsMixin, DistillHead):
    """
    "Distilling Object Detectors with Global Knowledge" (Tang et al., ECCV 2022; docs/methods/gkd.md)
    for two-stage (FPN Faster R-CNN) and one-stage (RetinaNet) students::

        L = L_det + lambda1 L_global + lambda2 L_feat + lambda3 L_resp           (Eq. 9)

    - Instances: two-stage, the student's positive sampled RoIs (``gt_classes != K``) with
      their matched class (the code's ``proposal_replace_gt``); RetinaNet (no RoIs), the
      ground-truth boxes of the batch with their classes, each once (a design choice: the
      GT boxes that PGM also uses; [UNVERIFIED] what the released one-stage code pools).
      Features are box-average-pooled FPN cells (integer windows) of un-adapted student /
      teacher maps, on the FPN levels of ``IN_FEATURES`` (p2..p6, or p3..p7 for RetinaNet).
    - Prototypes (PGM, Eqs. 2-5) are generated by :class:`~d2kd.heads.gkd.prototype_hook.PrototypeHook`
      (returned by :meth:`build_hooks`) before training and every ``PGM.PERIOD`` iterations,
      and held in persistent buffers (checkpointed under ``"distiller"``).
    - Robust weight (Eq. 8, detached): ``w = 1 - |max cos(f_s, P_s,c) - max cos(f_t, P_t,c)|``
      with the prototypes of the instance's class at that level (``ROBUST_WEIGHTS``), raised
      to at least ``ROBUST_WEIGHT_FLOOR`` (default 0; the formula reaches -1, and a negative
      weight turns a term into one the optimiser maximises: d2kd's choice, not the code's).
    - ``global_<level>`` (Eq. 6): SmoothL1 between ``w * phi`` of student and teacher on all
      prototypes of the level, every instance on every level, levels summed. ``PROJECTION``:
      "cosine" (the code) or "mp" (Eq. 5 coefficients; the paper's wording, [UNVERIFIED]).
    - ``feat_<level>`` (Eq. 7): 3x3-conv adapter; each instance fills its box window at its
      assigned level (5-level scale rule, p2..p6) with ``w``, later boxes overwriting earlier
      ones (the code's order-dependent mask, ``box_value_mask(reduce="overwrite")``);
      foreground term ``FG_WEIGHT`` normalised by ``2 C sum M``, optional background term
      ``BG_WEIGHT`` (4 in the code, absent from the paper); averaged over levels.
      The mask windows include the ``floor(x2/s)`` cell (the +1 convention of the code's
      PGM and global loss); the code's own mask stops one cell earlier.
    - ``resp`` (:func:`response_loss`): ``w_r * T^2 * KL`` per distilled row, mean over rows.
      Two-stage: the positive RoIs' K+1 softmax logits (teacher box head on the student's
      RoIs); ``w_r`` uses the RoIAlign features averaged, at the RoI pooler's level (as
      ``r2i_soft_weight``). RetinaNet: the student's positive anchors (its ``label_anchors``,
      ``0 <= label < K``), the teacher's dense head on the same anchors, normalised by the
      number of positive anchors of the batch; ``ANCHOR_KL`` "binary" (default) sums the
      per-class binary KL of the K sigmoid logits, "softmax" reproduces the released code's
      softmax across them (docs/methods/gkd.md: a mismatch). ``w_r`` is the Eq. 8 weight of the
      GT instance the anchor is matched to, from its pooled features at the level the
      box-to-level rule assigns it (the level of its feature-term mask; the code's
      one-stage weighting is [UNVERIFIED]). ``KL_CLASS_MEAN`` (default) divides by the number
      of logits, K+1 or K: the ``1/(K+1)`` of docs/methods/gkd.md response formula (the
      code's mean over classes).
    - ``LINEAR_DECAY``: ``1 - iter / MAX_ITER`` on the global and feature terms only (the
      code's per-epoch ``kd_attenuation``; not in the paper).
    - Model pairs: the response term needs student and teacher of the same kind (two RoI
      heads, or two RetinaNets with the same anchors at the same resolution); the global and
      feature terms need FPN features only, so a mixed pair works with ``RESPONSE_WEIGHT 0``.
      For RetinaNet the feature term is averaged over levels as for two-stage; docs/methods/gkd.md reports the one-stage code sums them (5x the weight on 5 levels).

    Weights: the paper prints (lambda1, lambda2, lambda3) = (1, 1, 5) for Eq. 9 as
    reconstructed (the assignment is uncertain, docs/methods/gkd.md); the released code uses
    5 on the global term, fg 1 + bg 4 on the feature term and 1 on the KL, and, because of
    a config switch, trains WITHOUT the global term (preset ``gkd_released_code``).

    Explicit construction: ``GKD(student=student, teacher=teacher, pairing=FeaturePairing(student,
    teacher, ["p2", "p3", "p4", "p5", "p6"], adapter_kernel=3), pgm={"NUM_PROTOTYPES": 5})``
    (``pgm``: ``DISTILL.GKD.PGM`` options over :data:`PGM_DEFAULTS`, read by the prototype hook;
    ``max_iter``: the ``LINEAR_DECAY`` horizon). The models are checked and read, not kept.
    """

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.GKD = CN()
        # Eq. 9 weights lambda1 (global), lambda2 (feature), lambda3 (response); 0 disables a term.
        node.GLOBAL_WEIGHT = 1.0
        node.FEATURE_WEIGHT = 1.0
        node.RESPONSE_WEIGHT = 5.0
        # Eq. 8 robust weights on all terms (False: w = 1).
        node.ROBUST_WEIGHTS = True
        # Lower bound of the Eq. 8 weight, which lies in [-1, 1]: a negative weight turns an
        # instance's squared-error / KL term into one the optimiser maximises, without bound.
        # 0.0 drops such instances (d2kd's default, docs/methods/gkd.md); -1.0 keeps the code's
        # unclamped weight.
        node.ROBUST_WEIGHT_FLOOR = 0.0
        # Eq. 6 projection: "cosine" (released code) or "mp" (Eq. 5 coefficients, [UNVERIFIED]).
        node.PROJECTION = "cosine"
        # Eq. 7: foreground weight, background weight (code: 4; paper: none).
        node.FG_WEIGHT = 1.0
        node.BG_WEIGHT = 0.0
        # Response KL temperature; KL_CLASS_MEAN: divide the KL by K+1 (K on RetinaNet), the
        # 1/(K+1) of the response formula (docs/methods/gkd.md, paper text + code). False sums over
        # classes: with RESPONSE_WEIGHT 5 that is (K+1)x the scale.
        node.TEMPERATURE = 2.0
        node.KL_CLASS_MEAN = True
        # RetinaNet response on the sigmoid logits: "binary" (per-class binary KL) or "softmax"
        # (the released code's softmax across the K sigmoid logits, docs/methods/gkd.md).
        node.ANCHOR_KL = "binary"
        # 1 - iter/MAX_ITER on the global and feature terms (code's kd_attenuation).
        node.LINEAR_DECAY = False
        # FPN levels (5-level rule needs consecutive levels) and the 3x3 adapter of Eq. 7.
        add_feature_pairing_config(node, kernel_size=3)
        node.PGM = CN(dict(PGM_DEFAULTS))

    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        pairing: FeaturePairing,
        global_weight: float = 1.0,
        feature_weight: float = 1.0,
        response_weight: float = 5.0,
        robust_weights: bool = True,
        robust_weight_floor: float = 0.0,
        projection: str = "cosine",
        fg_weight: float = 1.0,
        bg_weight: float = 0.0,
        temperature: float = 2.0,
        kl_class_mean: bool = True,
        anchor_kl: str = "binary",
        linear_decay: bool = False,
        max_iter: int = 0,
        class_names: Optional[Sequence[str]] = None,
        pgm: Optional[Mapping] = None,
    ):
        super().__init__()
        unknown = sorted(set(pgm or {}) - set(PGM_DEFAULTS))
        if unknown:
            raise ValueError(f"Unknown GKD prototype (PGM) options {unknown}; known: {sorted(PGM_DEFAULTS)}.")
        # The DISTILL.PGM options (read by the PrototypeHook too).
        self.pgm_options = CN({**PGM_DEFAULTS, **dict(pgm or {})})
        _check_options(
            projection=projection,
            weights={
                "GLOBAL_WEIGHT": global_weight,
                "FEATURE_WEIGHT": feature_weight,
                "RESPONSE_WEIGHT": response_weight,
                "FG_WEIGHT": fg_weight,
                "BG_WEIGHT": bg_weight,
            },
            robust_weight_floor=robust_weight_floor,
            temperature=temperature,
            anchor_kl=anchor_kl,
            pgm=self.pgm_options,
        )
        self.two_stage = self._check_student(student)
        self.global_weight = float(global_weight)
        self.feature_weight = float(feature_weight)
        self.response_weight = float(response_weight)
        self.use_robust = bool(robust_weights)
        self.robust_floor = float(robust_weight_floor)
        self.projection = projection
        self.alpha = float(self.pgm_options.ALPHA)
        self.fg_weight, self.bg_weight = float(fg_weight), float(bg_weight)
        self.temperature = float(temperature)
        self.kl_class_mean = bool(kl_class_mean)
        self.anchor_kl = anchor_kl
        self.decay = DistillSchedule(linear_decay=linear_decay, max_iter=max_iter)
        self.input_scale = float(pairing.teacher_input_scale)

        self.pairing = pairing
        if self.feature_weight == 0:
            # No feature term: no adapters (an unused parameter would break DDP).
            self.pairing.adapters.clear()
        self.names: List[str] = list(self.pairing.names)
        self.teacher_names: Dict[str, str] = dict(self.pairing.teacher_names)
        self.student_strides = {n: self.pairing.student_strides[n] for n in self.names}
        self.teacher_strides = {n: self.pairing.teacher_strides[n] for n in self.names}
        levels = [math.log2(self.student_strides[n]) for n in self.names]
        if any(l != int(l) for l in levels) or [int(l) for l in levels] != list(range(int(levels[0]), int(levels[0]) + len(levels))):
            raise DistillConfigError(
                f"DISTILL.GKD.IN_FEATURES {self.names} have strides {[self.student_strides[n] for n in self.names]}; "
                "GKD assigns instances to levels by scale and needs consecutive FPN levels in increasing "
                'order, e.g. ["p2", "p3", "p4", "p5", "p6"].'
            )
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        # Box-to-level rule of the detector kind: one-stage codes count levels from P3 (<112 px).
        self.canonical_box_size = canonical_box_size_for(not self.two_stage)

        self.num_classes = student.roi_heads.num_classes if self.two_stage else student.num_classes
        if not class_names or len(class_names) != self.num_classes:
            class_names = [f"class {c}" for c in range(self.num_classes)]
        self.class_names = list(class_names)

        k = int(self.pgm_options.NUM_PROTOTYPES)
        for n in self.names:
            self.register_buffer(
                f"prototypes_student_{n}", torch.zeros(self.num_classes, k, self.pairing.student_channels[n])
            )
            t_channels = self.pairing.teacher_channels[n]
            self.register_buffer(f"prototypes_teacher_{n}", torch.zeros(self.num_classes, k, t_channels))
        self.register_buffer("prototype_valid", torch.zeros(len(self.names), self.num_classes, dtype=torch.uint8))
        # Iteration before which the prototypes were computed; -1 = never.
        self.register_buffer("prototype_iter", torch.tensor(-1, dtype=torch.long))

        self.capture_pairing(self.pairing)
        if self.response_weight > 0:
            self._require_response_outputs(student, teacher)
        elif self.two_stage:
            self.student_methods.append(SAMPLED_PROPOSALS)

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        train_sets = cfg.DATASETS.TRAIN
        thing_classes = MetadataCatalog.get(train_sets[0]).get("thing_classes", None) if train_sets else None
        return {
            "student": context.student,
            "teacher": context.teacher,
            "pairing": feature_pairing_from_config(opts, context, cfg),
            "global_weight": opts.GLOBAL_WEIGHT,
            "feature_weight": opts.FEATURE_WEIGHT,
            "response_weight": opts.RESPONSE_WEIGHT,
            "robust_weights": opts.ROBUST_WEIGHTS,
            "robust_weight_floor": opts.ROBUST_WEIGHT_FLOOR,
            "projection": opts.PROJECTION,
            "fg_weight": opts.FG_WEIGHT,
            "bg_weight": opts.BG_WEIGHT,
            "temperature": opts.TEMPERATURE,
            "kl_class_mean": opts.KL_CLASS_MEAN,
            "anchor_kl": opts.ANCHOR_KL,
            "linear_decay": opts.LINEAR_DECAY,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "class_names": thing_classes,
            "pgm": dict(opts.PGM),
        }

    @staticmethod
    def _check_student(student) -> bool:
        """Whether the student is two-stage; a DistillConfigError if it is neither kind."""
        two_stage = _has_box_head(student)
        if not two_stage and not is_dense_detector(student):
            raise DistillConfigError(
                "GKD distils instances: the positive sampled RoIs of a two-stage detector, or the ground-truth "
                f"boxes and positive anchors of a RetinaNet; the student ({type(student).__name__}) has neither an "
                "RoI box head nor a dense head. Use an FPN Faster R-CNN or a RetinaNet student."
            )
        return two_stage

    def _require_response_outputs(self, student, teacher):
        """Captures of the response term: RoI logits (two-stage) or dense outputs (RetinaNet)."""
        try:
            if self.two_stage:
                self._require_roi_logits(student, teacher)
            else:
                self._require_dense_outputs(student, teacher, self.input_scale)
        except DistillConfigError as e:
            raise DistillConfigError(
                f"{e} (GKD response term: DISTILL.GKD.RESPONSE_WEIGHT 0 keeps only the global and feature "
                "terms, which need FPN features only.)"
            ) from None
        if self.two_stage:
            pooler = student.roi_heads.box_pooler
            self._pooler_levels = (pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level)
            self._box_in_features = list(student.roi_heads.box_in_features)
            if self.use_robust:
                box_features = self._box_in_features
                missing = [f for f in box_features if f not in self.names]
                if missing:
                    raise DistillConfigError(
                        f"The robust weights of the GKD response term use the RoI features of levels "
                        f"{box_features}, but DISTILL.GKD.IN_FEATURES {self.names} has no prototypes for "
                        f"{missing}. Add them to IN_FEATURES or set DISTILL.GKD.ROBUST_WEIGHTS False."
                    )
                self.student_modules.append(BOX_POOLER)
                self.teacher_modules.append(BOX_POOLER)

    # -- prototypes -----------------------------------------------------------------------
    @property
    def needs_prototypes(self) -> bool:
        return self.global_weight > 0 or self.use_robust

    def prototypes_ready(self) -> bool:
        return int(self.prototype_iter) >= 0

    def prototypes(self, name: str):
        """``(student (C, K, Ds), teacher (C, K, Dt), valid (C,))`` of one level."""
        level = self.names.index(name)
        return (
            getattr(self, f"prototypes_student_{name}"),
            getattr(self, f"prototypes_teacher_{name}"),
            self.prototype_valid[level],
        )

    def prototype_buffers(self) -> List[torch.Tensor]:
        out = []
        for n in self.names:
            out += [getattr(self, f"prototypes_student_{n}"), getattr(self, f"prototypes_teacher_{n}")]
        return out + [self.prototype_valid, self.prototype_iter]

    @torch.no_grad()
    def set_prototypes(self, level: int, cls: int, student: torch.Tensor, teacher: torch.Tensor):
        name = self.names[level]
        getattr(self, f"prototypes_student_{name}")[cls].copy_(student)
        getattr(self, f"prototypes_teacher_{name}")[cls].copy_(teacher)
        self.prototype_valid[level, cls] = 1

    @torch.no_grad()
    def clear_prototypes(self, cls: int):
        for level, name in enumerate(self.names):
            getattr(self, f"prototypes_student_{name}")[cls].zero_()
            getattr(self, f"prototypes_teacher_{name}")[cls].zero_()
            self.prototype_valid[level, cls] = 0

    def build_hooks(self, trainer):
        if not self.needs_prototypes:
            return []
        from .prototype_hook import PrototypeHook

        return [PrototypeHook(self, trainer)]

    # -- losses ---------------------------------------------------------------------------
    def forward(self, student, teacher, step):
        if self.needs_prototypes and not self.prototypes_ready():
            raise RuntimeError(
                "GKD prototypes have not been generated. They are made by the PrototypeHook that "
                "GKD.build_hooks returns (DistillTrainer registers it); in a custom loop, register "
                "head.build_hooks(trainer) or call PrototypeHook.update() before training."
            )
        proposals = self.sampled_proposals(student) if self.two_stage else None
        boxes, labels = self._instances(proposals, step)
        decay = self.decay(step.iteration)
        terms = {}
        if self.global_weight > 0 or self.feature_weight > 0:
            terms.update(self._instance_terms(student, teacher, boxes, labels, decay))
        if self.response_weight > 0:
            if self.two_stage:
                rows = self._roi_response_rows(student, teacher, proposals, boxes, labels)
                divergence = "softmax"
            else:
                rows = self._anchor_response_rows(student, teacher)
                divergence = self.anchor_kl
            student_logits, teacher_logits, weights = rows
            if weights is not None:
                _put_scalar("gkd/robust_weight_resp", weights)
            terms["resp"] = self.response_weight * response_loss(
                student_logits, teacher_logits, weights, self.temperature, divergence, self.kl_class_mean
            )
        return terms

    def _instances(self, proposals, step):
        """Per image, the instance boxes ``(n, 4)`` and classes ``(n,)``: positive RoIs, or GT boxes."""
        boxes, labels = [], []
        if self.two_stage:
            for p in proposals:
                pos = (p.gt_classes >= 0) & (p.gt_classes != self.num_classes)
                boxes.append(p.proposal_boxes.tensor[pos].detach())
                labels.append(p.gt_classes[pos])
            return boxes, labels
        for inst in step.gt_instances:
            b = gt_boxes_of(inst)
            boxes.append(b.detach().float())
            has_classes = inst is not None and inst.has("gt_classes")
            labels.append(inst.gt_classes.long() if has_classes else torch.zeros(0, dtype=torch.long, device=b.device))
        return boxes, labels

    def _pool_instances(self, s, t, name, boxes):
        """Box-average-pooled student ``(n, Cs)`` and (detached) teacher ``(n, Ct)`` features at
        level ``name`` of the per-image boxes (student coordinates)."""
        pooled_s = torch.cat([box_average_pool(s[i], b, self.student_strides[name]) for i, b in enumerate(boxes)])
        with torch.no_grad():
            pooled_t = torch.cat(
                [box_average_pool(t[i], b * self.input_scale, self.teacher_strides[name]) for i, b in enumerate(boxes)]
            )
        return pooled_s, pooled_t

    def _robust_weights(self, pooled_s, pooled_t, name, labels) -> torch.Tensor:
        """Eq. 8 weights (:func:`~d2kd.heads.gkd.prototypes.robust_weights`) of instances pooled
        at level ``name``, raised to at least ``ROBUST_WEIGHT_FLOOR``. A negative weight would
        make the optimiser push the student away from the teacher on that instance."""
        w = robust_weights(pooled_s, pooled_t, *self.prototypes(name), labels)
        return w.clamp(min=self.robust_floor)

    @torch.no_grad()
    def _assigned_level_weights(self, student, teacher, boxes, labels) -> List[torch.Tensor]:
        """Per image, the Eq. 8 weight of each instance at the level the box-to-level rule
        assigns it (the level whose feature-term mask it fills)."""
        weights = [torch.ones(len(b), device=b.device) for b in boxes]
        assigned = [assign_boxes_to_levels(b, self.min_level, self.max_level, self.canonical_box_size) for b in boxes]
        for li, name in enumerate(self.names):
            here = [a == self.min_level + li for a in assigned]
            if not any(bool(h.any()) for h in here):
                continue
            s = self.pairing.student_feature(student, name)
            t = self.pairing.teacher_feature(teacher, name)
            pooled_s, pooled_t = self._pool_instances(s, t, name, [b[h] for b, h in zip(boxes, here)])
            w = self._robust_weights(pooled_s, pooled_t, name, torch.cat([l[h] for l, h in zip(labels, here)]))
            for w_img, h, part in zip(weights, here, w.split([int(h.sum()) for h in here])):
                w_img[h] = part.to(w_img.dtype)
        return weights

    def _instance_terms(self, student, teacher, boxes, labels, decay):
        """``global_<level>`` and ``feat_<level>`` terms."""
        terms = {}
        assigned = [assign_boxes_to_levels(b, self.min_level, self.max_level, self.canonical_box_size) for b in boxes]
        mask_weights = []
        for li, name in enumerate(self.names):
            level = self.min_level + li
            s = self.pairing.student_feature(student, name)
            t = self.pairing.teacher_feature(teacher, name).detach()
            # Instances pooled at this level: all of them for the global term, else those assigned here.
            chosen = [
                torch.arange(len(b), device=b.device) if self.global_weight > 0 else torch.nonzero(a == level).flatten()
                for b, a in zip(boxes, assigned)
            ]
            inst_labels = torch.cat([l[c] for l, c in zip(labels, chosen)])
            pooled_s, pooled_t = self._pool_instances(s, t, name, [b[c] for b, c in zip(boxes, chosen)])
            if self.use_robust:
                w = self._robust_weights(pooled_s, pooled_t, name, inst_labels)
            else:
                w = torch.ones(len(inst_labels), device=s.device)
            if self.global_weight > 0:
                ps, pt, valid = self.prototypes(name)
                keep = valid.bool()
                loss = global_knowledge_loss(
                    pooled_s, pooled_t, ps[keep].flatten(0, 1), pt[keep].flatten(0, 1), w, self.projection, self.alpha
                )
                terms[f"global_{name}"] = self.global_weight * decay * loss
            if self.feature_weight > 0:
                # Adapted student map and teacher map over the same cells (FeaturePairing.align
                # also handles a teacher at another input scale).
                adapted, t = self.pairing.align(name, s, t)
                masks, start = [], 0
                for i, (b, c) in enumerate(zip(boxes, chosen)):
                    here = assigned[i][c] == level
                    w_i = w[start : start + len(c)][here]
                    start += len(c)
                    mask_weights.append(w_i)
                    masks.append(
                        box_value_mask(
                            b[c][here] * self.input_scale, w_i, self.teacher_strides[name], tuple(t.shape[-2:]), "overwrite"
                        )
                    )
                loss = decoupled_feature_loss(adapted, t, torch.stack(masks), self.fg_weight, self.bg_weight)
                terms[f"feat_{name}"] = self.feature_weight * decay * loss / len(self.names)
        if mask_weights:
            _put_scalar("gkd/robust_weight_feat", torch.cat(mask_weights))
        return terms

    def _roi_response_rows(self, student, teacher, proposals, boxes, labels):
        """Two-stage response rows: the positive RoIs' ``(R, K+1)`` logits of both models and
        their Eq. 8 weights (RoIAlign features averaged, at the RoI pooler's level), or None."""
        student_scores, _ = self.roi_predictions(student)
        teacher_scores, _ = self.roi_predictions(teacher)
        gt_classes = torch.cat([p.gt_classes for p in proposals])
        pos = (gt_classes >= 0) & (gt_classes != self.num_classes)
        weights = None
        if self.use_robust:
            pos_boxes, pos_labels = torch.cat(boxes), torch.cat(labels)
            weights = torch.ones(len(pos_labels), device=pos_boxes.device)
            if len(pos_labels):
                s_roi = student.output(BOX_POOLER)[pos].mean(dim=(2, 3))
                t_roi = teacher.output(BOX_POOLER)[pos].mean(dim=(2, 3))
                level_idx = pooler_levels([Boxes(pos_boxes)], *self._pooler_levels)
                for idx in level_idx.unique().tolist():
                    sel = level_idx == idx
                    name = self._box_in_features[idx]
                    weights[sel] = self._robust_weights(s_roi[sel], t_roi[sel], name, pos_labels[sel])
        return student_scores[pos], teacher_scores[pos], weights

    def _anchor_response_rows(self, student, teacher):
        """RetinaNet response rows: the student's positive anchors (``0 <= label < K`` in its
        ``label_anchors``), their ``(P, K)`` sigmoid logits in both models, and the Eq. 8 weight
        of the GT instance (matched box and class) each anchor is matched to, or None."""
        student_logits, teacher_logits = self.paired_dense_logits(student, teacher)
        anchor_labels = self.anchor_labels(student)
        positive = (anchor_labels >= 0) & (anchor_labels < self.num_classes)
        weights = None
        if self.use_robust:
            matched = self.matched_gt_boxes(student).detach().float()
            # One weight per matched GT instance (box, class), shared by all its positive anchors.
            instances, inverse, offset = [], [], 0
            for i in range(len(positive)):
                keys = torch.cat([matched[i][positive[i]], anchor_labels[i][positive[i]][:, None].float()], dim=1)
                if len(keys):
                    unique, index = torch.unique(keys, dim=0, return_inverse=True)
                else:
                    unique, index = keys, torch.zeros(0, dtype=torch.long, device=keys.device)
                instances.append(unique)
                inverse.append(index + offset)
                offset += len(unique)
            gt_weights = self._assigned_level_weights(
                student, teacher, [u[:, :4] for u in instances], [u[:, 4].long() for u in instances]
            )
            weights = torch.cat(gt_weights)[torch.cat(inverse)]
        return student_logits[positive], teacher_logits[positive], weights


def _check_options(*, projection, weights, robust_weight_floor, temperature, anchor_kl, pgm):
    """The option values of :class:`GKD` (``weights``: the term weights by config key; ``pgm``:
    the ``PGM`` node), all problems in one :class:`DistillConfigError` naming ``DISTILL.GKD``."""
    problems = []
    if projection not in PROJECTIONS:
        problems.append(f"PROJECTION must be one of {PROJECTIONS}, got {projection!r}")
    for key, value in weights.items():
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    if weights["GLOBAL_WEIGHT"] == 0 and weights["FEATURE_WEIGHT"] == 0 and weights["RESPONSE_WEIGHT"] == 0:
        problems.append("GLOBAL_WEIGHT, FEATURE_WEIGHT and RESPONSE_WEIGHT are all 0: nothing to distil")
    if weights["FEATURE_WEIGHT"] > 0 and weights["FG_WEIGHT"] == 0 and weights["BG_WEIGHT"] == 0:
        problems.append("FEATURE_WEIGHT > 0 but FG_WEIGHT and BG_WEIGHT are 0")
    if not -1.0 <= robust_weight_floor <= 1.0:
        problems.append(f"ROBUST_WEIGHT_FLOOR must be in [-1, 1] (the range of Eq. 8), got {robust_weight_floor}")
    if temperature <= 0:
        problems.append(f"TEMPERATURE must be > 0, got {temperature}")
    if anchor_kl not in ANCHOR_KL_FORMS:
        problems.append(f"ANCHOR_KL must be one of {ANCHOR_KL_FORMS}, got {anchor_kl!r}")
    if pgm.NUM_PROTOTYPES < 1:
        problems.append(f"PGM.NUM_PROTOTYPES must be >= 1, got {pgm.NUM_PROTOTYPES}")
    if pgm.ALPHA < 0:
        problems.append(f"PGM.ALPHA must be >= 0, got {pgm.ALPHA}")
    if pgm.PERIOD < 0:
        problems.append(f"PGM.PERIOD must be >= 0 (0 = one epoch), got {pgm.PERIOD}")
    if pgm.MAX_IMAGES_PER_CLASS < 1:
        problems.append(f"PGM.MAX_IMAGES_PER_CLASS must be >= 1, got {pgm.MAX_IMAGES_PER_CLASS}")
    if pgm.MIN_BOX_SIZE < 0:
        problems.append(f"PGM.MIN_BOX_SIZE must be >= 0, got {pgm.MIN_BOX_SIZE}")
    if pgm.DENSITY_KERNEL <= 0:
        problems.append(f"PGM.DENSITY_KERNEL must be > 0, got {pgm.DENSITY_KERNEL}")
    if not 0 <= pgm.DENSITY_PERCENTILE < 100:
        problems.append(f"PGM.DENSITY_PERCENTILE must be in [0, 100), got {pgm.DENSITY_PERCENTILE}")
    if problems:
        raise DistillConfigError("Invalid DISTILL.GKD options: " + "; ".join(problems) + ".")


def _put_scalar(name: str, values: torch.Tensor):
    """Log the mean of ``values`` (if any) to the trainer's EventStorage."""
    if values.numel() == 0:
        return
    try:
        get_event_storage().put_scalar(name, float(values.float().mean()))
    except AssertionError:  # outside a trainer
        pass


def _has_box_head(model) -> bool:
    """A two-stage detector with an RoI box head (Detectron2 ``GeneralizedRCNN``)."""
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and hasattr(roi_heads, "box_predictor")
