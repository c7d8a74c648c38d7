"""Channel-wise distillation (Shu et al., ICCV 2021; docs/methods/cwd.md)."""

from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..losses import kd_kl_div
from ..modeling.feature_pairs import (
    FeaturePairing,
    add_feature_pairing_config,
    feature_pairing_adapting_mismatched_channels,
)
from .base import DISTILL_HEAD_REGISTRY, DistillConfigError
from .feature_imitation import FeatureImitationHead

__all__ = ["CWD", "channel_wise_divergence"]


def channel_wise_divergence(student, teacher, tau: float = 1.0):
    """
    CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
    Eq. 3-4): each channel's H×W map becomes a distribution ``φ(y_c) = softmax_hw(y_c/τ)``::

        L = τ² / (N·C) · Σ_{n,c} KL( φ(y^T_{n,c}) || φ(y^S_{n,c}) )

    i.e. Hinton's soft-label KL (:func:`kd_kl_div`) with the ``N·C`` channel maps as rows and
    the ``H·W`` positions as classes. The teacher is detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"CWD needs equal student and teacher shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    n, c = student.shape[:2]
    return kd_kl_div(student.reshape(n * c, -1), teacher.reshape(n * c, -1), tau)


@DISTILL_HEAD_REGISTRY.register()
class CWD(FeatureImitationHead):
    """
    Channel-wise distillation of the FPN levels ``IN_FEATURES`` (p2..p6, as mmrazor's Faster
    R-CNN R101 -> R50 config): one term per level, ``WEIGHT * channel_wise_divergence(S_l, T_l,
    TAU)``, logged as ``loss_kd_cwd_<level>``; levels are summed (mmrazor: one loss per
    level, each with loss_weight 10, τ = 1).

    The student is used as is when its channels match the teacher's (mmrazor's FPN configs
    have no connector); a 1x1 conv adapter (FeaturePairing) is built when the channel counts
    differ, or for every level when ``ADAPTER.ENABLED`` is True.

    Explicit construction: ``CWD(pairing=FeaturePairing(student, teacher, ["p2", "p3"],
    adapter_enabled=False), weight=10.0, tau=1.0)`` (the adapter choice is then the caller's).
    """

    pairing_from_config = staticmethod(feature_pairing_adapting_mismatched_channels)

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.CWD = CN()
        cfg.DISTILL.CWD.WEIGHT = 10.0
        cfg.DISTILL.CWD.TAU = 1.0
        add_feature_pairing_config(cfg.DISTILL.CWD)
        # False: an adapter only where the channel counts differ.
        cfg.DISTILL.CWD.ADAPTER.ENABLED = False

    @configurable
    def __init__(self, *, pairing: FeaturePairing, weight: float = 10.0, tau: float = 1.0):
        if tau <= 0:
            raise DistillConfigError(f"DISTILL.CWD.TAU must be > 0, got {tau}.")
        super().__init__(pairing=pairing, weight=weight)
        self.tau = tau

    @classmethod
    def loss_options(cls, opts):
        return {"weight": opts.WEIGHT, "tau": opts.TAU}

    def level_loss(self, level, adapted, target):
        return channel_wise_divergence(adapted, target, self.tau)
