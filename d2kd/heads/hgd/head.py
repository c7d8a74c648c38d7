"""
HGD-like all-stage feature imitation, reconstructed from the abstract of Qin et al.,
"Hands-on Guidance for Distilling Object Detectors" (arXiv 2103.14337, 2021; docs/methods/hgd.md).
"""

from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage

from ...losses.imitation import IMITATION_DISTANCES, standardize_features, weighted_imitation_loss
from ...modeling.feature_pairs import FeaturePairing, add_feature_pairing_config, feature_pairing_from_config
from .spatial_weights import MICRO_MODES, spatial_weight_map
from .stage_matching import MATCH_MODES, match_stages
from .stage_weights import MACRO_MODES, StageWeighting
from ..base import DISTILL_HEAD_REGISTRY, DistillConfigError, DistillHead

__all__ = ["HGD"]

ALL_STAGES = ("res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6")
FEATURE_NORMS = ("none", "standardize")


@DISTILL_HEAD_REGISTRY.register()
class HGD(DistillHead):
    """
    A **reconstruction** of HGD (Qin et al. 2021). Only the paper's abstract could be read
    (docs/methods/hgd.md): it distils "all stage features", establishes a "correspondence" between
    teacher and student stages "for consistency", measures imitation with a "hands-on
    imitation loss", and re-weights the optimisation from a "micro" and a "macro"
    perspective. Every formula below is therefore [UNVERIFIED] (docs/methods/hgd.md, "HGD-like"),
    and each piece is an option so it can be swapped once the paper's form is known
    (docs/methods/hgd.md explains each choice). Do not report results as a reproduction of the paper.

    1. **All stages** (``IN_FEATURES``): backbone stages ``res2..res5``
       (``backbone.bottom_up``) and pyramid levels ``p2..p6`` (``backbone``).
    2. **Correspondence**: each student stage ``k`` is paired with the teacher stage of the
       same kind and stride (``MATCH``: ``"stride"`` | ``"nearest_stride"`` | ``"name"``), or
       with ``TEACHER_FEATURES[k]`` when that list is given (explicit pairs). A per-pair
       adapter ``f_k`` (conv, ``ADAPTER.*``) maps student channels to teacher channels and a
       bilinear resize matches the teacher's size (:class:`FeaturePairing`). A pairing that
       cannot be built is a :class:`DistillConfigError` at build time.
    3. **Imitation loss** per stage (docs/methods/hgd.md, normalised per channel so stages of
       different width and size are comparable)::

           L_k = sum_{b,c,h,w} w^k_{b,h,w} d(f_k(S_k) - T_k) / (2 * C_k * sum_{b,h,w} w^k_{b,h,w})

       ``LOSS.DISTANCE`` (``d``: l2 | l1 | smooth_l1), ``LOSS.CHANNEL_REDUCTION``
       (mean: ``/C_k`` | sum), ``LOSS.NORMALIZER`` (weight_sum | num_cells), ``LOSS.HALF``
       (the 1/2), ``LOSS.FEATURE_NORM`` (none | standardize both maps per channel first);
       see :func:`weighted_imitation_loss`.
    4. **Micro re-weighting** ``w^k`` (where to look; ``MICRO.MODE``): ``"gt"`` =
       ``FG_WEIGHT`` inside the GT boxes' windows on stage ``k`` (box coordinates divided by
       the teacher's stride in student pixels), ``BG_WEIGHT`` outside; ``"attention"`` = the
       teacher's spatial attention ``H W softmax(mean_c |T_k| / TEMPERATURE)``;
       ``"gt+attention"`` = their product; ``"none"`` = 1.
    5. **Macro re-weighting** (how much each stage counts, across stages and over training;
       ``MACRO.MODE``): ``L_HGD = WEIGHT * sum_k rho_k L_k`` with ``rho`` from
       :class:`StageWeighting`: ``"fixed"`` (``MACRO.WEIGHTS``), ``"loss_norm"`` (inverse
       running loss magnitude, ``rho`` summing to the number of stages or to 1) or
       ``"learned"`` (uncertainty weighting with bounded log-variances and a regulariser
       term ``logvar``). Running statistics are head buffers (checkpointed).

    Terms: ``loss_kd_hgd_<stage>`` = ``WEIGHT * rho_k * L_k`` (plus ``loss_kd_hgd_logvar``
    in ``"learned"`` mode). Each step also logs ``kd_hgd/weight_<stage>`` (``rho_k``) and
    ``kd_hgd/raw_<stage>`` (``L_k``) to the EventStorage; they are not losses.

    Explicit construction: ``HGD(pairing=FeaturePairing(student, teacher, ["res4", "p4"],
    ["res4", "p4"]), micro_mode="gt", macro_mode="fixed")``: the correspondence is the
    pairing's (``match_stages`` finds one as ``MATCH`` does); the other arguments are the
    ``LOSS``/``MICRO``/``MACRO`` options in lower case, prefixed by their group for MICRO/MACRO.
    """

    # An empty IN_FEATURES means every stage: the bottom-up stages (res2..res5), then the FPN levels.
    LEVEL_SOURCE = "stages"

    @classmethod
    def add_config(cls, cfg):
        _C = cfg.DISTILL.HGD = CN()
        _C.WEIGHT = 1.0
        # IN_FEATURES: student stages; TEACHER_FEATURES: explicit teacher partners (one per
        # student stage, in order), empty = matched automatically by MATCH; ADAPTER.*.
        add_feature_pairing_config(_C, kernel_size=1, init_std=0.0)
        _C.MATCH = "stride"  # stride | nearest_stride | name
        _C.LOSS = CN()
        _C.LOSS.DISTANCE = "l2"  # l2 | l1 | smooth_l1
        _C.LOSS.SMOOTH_L1_BETA = 1.0
        _C.LOSS.CHANNEL_REDUCTION = "mean"  # mean | sum
        _C.LOSS.NORMALIZER = "weight_sum"  # weight_sum | num_cells
        _C.LOSS.HALF = True
        _C.LOSS.FEATURE_NORM = "none"  # none | standardize
        _C.MICRO = CN()
        _C.MICRO.MODE = "gt+attention"  # none | gt | attention | gt+attention
        _C.MICRO.FG_WEIGHT = 1.0
        _C.MICRO.BG_WEIGHT = 0.5
        _C.MICRO.TEMPERATURE = 0.5
        _C.MACRO = CN()
        _C.MACRO.MODE = "loss_norm"  # fixed | loss_norm | learned
        # Base/fixed weight per stage, in IN_FEATURES order; empty = 1 for every stage.
        _C.MACRO.WEIGHTS = []
        _C.MACRO.MOMENTUM = 0.9  # EMA of the per-stage losses
        _C.MACRO.NORMALIZE_TO = "num_stages"  # num_stages | one   (loss_norm)
        _C.MACRO.LOG_VAR_LIMIT = 4.0  # |s_k| bound (learned)

    @configurable
    def __init__(
        self,
        *,
        pairing: FeaturePairing,
        weight: float = 1.0,
        distance: str = "l2",
        smooth_l1_beta: float = 1.0,
        channel_reduction: str = "mean",
        normalizer: str = "weight_sum",
        half: bool = True,
        feature_norm: str = "none",
        micro_mode: str = "gt+attention",
        micro_fg_weight: float = 1.0,
        micro_bg_weight: float = 0.5,
        micro_temperature: float = 0.5,
        macro_mode: str = "loss_norm",
        macro_weights: Sequence[float] = (),
        macro_momentum: float = 0.9,
        macro_normalize_to: str = "num_stages",
        macro_log_var_limit: float = 4.0,
    ):
        super().__init__()
        self.loss_opts = CN(
            {
                "DISTANCE": distance,
                "SMOOTH_L1_BETA": smooth_l1_beta,
                "CHANNEL_REDUCTION": channel_reduction,
                "NORMALIZER": normalizer,
                "HALF": half,
                "FEATURE_NORM": feature_norm,
            }
        )
        self.micro = CN(
            {
                "MODE": micro_mode,
                "FG_WEIGHT": micro_fg_weight,
                "BG_WEIGHT": micro_bg_weight,
                "TEMPERATURE": micro_temperature,
            }
        )
        _check_options(self.loss_opts, self.micro, macro_mode)
        stages = list(pairing.names)
        _check_stages(stages)
        self.weight = weight
        self.pairing = pairing
        self.stages = stages
        self.teacher_stages = dict(pairing.teacher_names)
        # Teacher strides in student input pixels: where the GT boxes fall on each map.
        self.teacher_strides = {s: pairing.target_strides[s] for s in stages}
        try:
            self.macro = StageWeighting(
                stages, macro_mode, macro_weights, macro_momentum, macro_normalize_to, macro_log_var_limit
            )
        except ValueError as e:
            raise DistillConfigError(f"DISTILL.HGD.MACRO: {e}") from e
        self.capture_pairing(self.pairing)

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        if opts.MATCH not in MATCH_MODES:
            raise DistillConfigError(f"DISTILL.HGD.MATCH must be one of {MATCH_MODES}, got {opts.MATCH!r}.")
        stages = list(opts.IN_FEATURES)
        scale = cfg.DISTILL.TEACHER.INPUT_SCALE
        try:
            if opts.TEACHER_FEATURES:
                if len(opts.TEACHER_FEATURES) != len(stages):
                    raise ValueError(
                        f"DISTILL.HGD.TEACHER_FEATURES {list(opts.TEACHER_FEATURES)} must give one teacher stage "
                        f"per student stage in IN_FEATURES {stages} (or be empty to match by MATCH)."
                    )
                teacher_stages = list(opts.TEACHER_FEATURES)
            else:
                teacher_stages = match_stages(context.student, context.teacher, stages, opts.MATCH, scale)
            node = opts.clone()
            node.defrost()
            node.TEACHER_FEATURES = teacher_stages
            pairing = feature_pairing_from_config(node, context, cfg)
        except (ValueError, KeyError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise DistillConfigError(
                f"HGD stage correspondence cannot be built: {message} "
                "(options: DISTILL.HGD.IN_FEATURES, DISTILL.HGD.TEACHER_FEATURES, DISTILL.HGD.MATCH, "
                "DISTILL.HGD.ADAPTER.ENABLED)."
            ) from e
        return {
            "pairing": pairing,
            "weight": opts.WEIGHT,
            "distance": opts.LOSS.DISTANCE,
            "smooth_l1_beta": opts.LOSS.SMOOTH_L1_BETA,
            "channel_reduction": opts.LOSS.CHANNEL_REDUCTION,
            "normalizer": opts.LOSS.NORMALIZER,
            "half": opts.LOSS.HALF,
            "feature_norm": opts.LOSS.FEATURE_NORM,
            "micro_mode": opts.MICRO.MODE,
            "micro_fg_weight": opts.MICRO.FG_WEIGHT,
            "micro_bg_weight": opts.MICRO.BG_WEIGHT,
            "micro_temperature": opts.MICRO.TEMPERATURE,
            "macro_mode": opts.MACRO.MODE,
            "macro_weights": list(opts.MACRO.WEIGHTS),
            "macro_momentum": opts.MACRO.MOMENTUM,
            "macro_normalize_to": opts.MACRO.NORMALIZE_TO,
            "macro_log_var_limit": opts.MACRO.LOG_VAR_LIMIT,
        }

    def stage_losses(self, student, teacher, step):
        """The unweighted ``L_k`` of every stage (items 2-4 of the class docstring)."""
        gt_cache = {}
        losses = {}
        lo = self.loss_opts
        for stage, adapted, target, _ in self.pairing.pairs(student, teacher):
            weight = spatial_weight_map(
                self.micro.MODE,
                target,
                step.gt_instances,
                self.teacher_strides[stage],
                fg_weight=self.micro.FG_WEIGHT,
                bg_weight=self.micro.BG_WEIGHT,
                temperature=self.micro.TEMPERATURE,
                gt_cache=gt_cache,
            )
            if lo.FEATURE_NORM == "standardize":
                adapted, target = standardize_features(adapted), standardize_features(target.detach())
            losses[stage] = weighted_imitation_loss(
                adapted,
                target,
                weight,
                distance=lo.DISTANCE,
                channel_reduction=lo.CHANNEL_REDUCTION,
                normalizer=lo.NORMALIZER,
                half=lo.HALF,
                beta=lo.SMOOTH_L1_BETA,
            )
        return losses

    def forward(self, student, teacher, step):
        raw = self.stage_losses(student, teacher, step)
        weighted, weights, regulariser = self.macro(raw)
        _log_stage_scalars(self.name, self.stages, raw, weights)
        terms = {stage: self.weight * weighted[stage] for stage in self.stages}
        if regulariser is not None:
            # Trains only the learned weights; the "_logvar" suffix marks a regulariser, not an
            # imitation term.
            terms["logvar"] = self.weight * regulariser
        return terms


def _log_stage_scalars(name, stages, raw, weights):
    try:
        storage = get_event_storage()
    except AssertionError:  # outside a trainer (tests, pre-flight check)
        return
    weights = weights.detach().tolist()  # logging reads the values (as Detectron2's metrics do)
    for i, stage in enumerate(stages):
        storage.put_scalar(f"kd_{name}/weight_{stage}", weights[i])
        storage.put_scalar(f"kd_{name}/raw_{stage}", float(raw[stage].detach()))


def _check_stages(stages):
    if not stages:
        raise DistillConfigError("DISTILL.HGD.IN_FEATURES is empty: list the student stages to distil.")
    if len(set(stages)) != len(stages):
        raise DistillConfigError(f"DISTILL.HGD.IN_FEATURES lists a stage twice: {stages}.")


def _check_options(loss, micro, macro_mode):
    """The LOSS and MICRO options and MACRO.MODE, each error naming the option and its choices
    (the other MACRO options are checked by :class:`StageWeighting`)."""
    checks = [
        (
            loss.DISTANCE in IMITATION_DISTANCES,
            f"DISTILL.HGD.LOSS.DISTANCE must be one of {IMITATION_DISTANCES}, got {loss.DISTANCE!r}.",
        ),
        (loss.SMOOTH_L1_BETA > 0, f"DISTILL.HGD.LOSS.SMOOTH_L1_BETA must be > 0, got {loss.SMOOTH_L1_BETA}."),
        (
            loss.CHANNEL_REDUCTION in ("mean", "sum"),
            f"DISTILL.HGD.LOSS.CHANNEL_REDUCTION must be 'mean' or 'sum', got {loss.CHANNEL_REDUCTION!r}.",
        ),
        (
            loss.NORMALIZER in ("weight_sum", "num_cells"),
            f"DISTILL.HGD.LOSS.NORMALIZER must be 'weight_sum' or 'num_cells', got {loss.NORMALIZER!r}.",
        ),
        (
            loss.FEATURE_NORM in FEATURE_NORMS,
            f"DISTILL.HGD.LOSS.FEATURE_NORM must be one of {FEATURE_NORMS}, got {loss.FEATURE_NORM!r}.",
        ),
        (micro.MODE in MICRO_MODES, f"DISTILL.HGD.MICRO.MODE must be one of {MICRO_MODES}, got {micro.MODE!r}."),
        (
            micro.FG_WEIGHT >= 0 and micro.BG_WEIGHT >= 0 and micro.FG_WEIGHT + micro.BG_WEIGHT > 0,
            f"DISTILL.HGD.MICRO.FG_WEIGHT ({micro.FG_WEIGHT}) and BG_WEIGHT ({micro.BG_WEIGHT}) must be "
            ">= 0 and not both 0.",
        ),
        (micro.TEMPERATURE > 0, f"DISTILL.HGD.MICRO.TEMPERATURE must be > 0, got {micro.TEMPERATURE}."),
        (macro_mode in MACRO_MODES, f"DISTILL.HGD.MACRO.MODE must be one of {MACRO_MODES}, got {macro_mode!r}."),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillConfigError(message)
