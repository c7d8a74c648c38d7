"""FitNets hints on FPN levels (Romero et al., ICLR 2015; docs/methods/fitnet.md)."""

from detectron2.config import CfgNode as CN

from ..losses import feature_mse
from ..modeling.feature_pairs import add_feature_pairing_config
from .base import DISTILL_HEAD_REGISTRY
from .feature_imitation import FeatureImitationHead

__all__ = ["FitNet"]


@DISTILL_HEAD_REGISTRY.register()
class FitNet(FeatureImitationHead):
    """
    FitNets hint loss ``L_hint = ||u_T(x) - r(v_S(x))||^2`` (Romero et al. 2015, Eq. 2), with
    a learned regressor ``r`` (1x1 conv adapter) per level, applied jointly with detection
    training on whole feature maps (no mask), as detection papers use it (e.g. the "FitNet"
    row of Tang et al. 2022, Table 2).

    One term per level, ``WEIGHT * mean((r(S_l) - T_l)^2)``, logged as
    ``loss_kd_fitnet_<level>``; levels are summed. The original's ½ factor and two-stage
    hint pre-training are not used (docs/methods/fitnet.md: single-stage joint training with a
    mean-reduced MSE is the detection practice).

    Explicit construction: ``FitNet(pairing=FeaturePairing(student, teacher, ["p2", "p3"]),
    weight=1.0)`` (``FeaturePairing`` holds the regressors ``r``).
    """

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.FITNET = CN()
        cfg.DISTILL.FITNET.WEIGHT = 1.0
        add_feature_pairing_config(cfg.DISTILL.FITNET)

    def level_loss(self, level, adapted, target):
        return feature_mse(adapted, target)
