"""PKD, Pearson-correlation feature imitation (Cao et al., NeurIPS 2022; docs/methods/pkd.md)."""

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.config import configurable

from ..modeling.feature_pairs import (
    FeaturePairing,
    add_feature_pairing_config,
    feature_pairing_adapting_mismatched_channels,
)
from .base import DISTILL_HEAD_REGISTRY
from .feature_imitation import FeatureImitationHead

__all__ = ["PKD", "standardize_channels", "pearson_imitation_loss"]

# Added to each channel's standard deviation (the reference code's value).
STD_EPS = 1e-6


def standardize_channels(feature: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """
    Each channel of an ``(N, C, H, W)`` map standardised over its ``N·H·W`` values (the whole
    batch): ``(x - mean_c) / (std_c + eps)`` with the unbiased (``M - 1``) standard deviation,
    as the reference code normalises (Cao et al. 2022, Sec. 3.2, Eq. 2: zero mean and unit
    variance before imitation). A channel of a single value (``N·H·W == 1``) uses the biased
    deviation, 0, instead of an undefined one, so it standardises to 0.

    Computed in float32 (a mean over a large map is imprecise in half precision).
    """
    if feature.dim() != 4:
        raise ValueError(f"PKD standardises (N, C, H, W) maps, got shape {tuple(feature.shape)}.")
    per_channel = feature.float().transpose(0, 1).flatten(1)  # (C, N*H*W)
    mean = per_channel.mean(dim=1, keepdim=True)
    std = per_channel.std(dim=1, keepdim=True, correction=1 if per_channel.shape[1] > 1 else 0)
    standardized = (per_channel - mean) / (std + eps)
    n, c, h, w = feature.shape
    return standardized.reshape(c, n, h, w).transpose(0, 1)


def pearson_imitation_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """
    PKD's feature imitation of one level (Cao et al., "PKD: General Distillation Framework for
    Object Detectors via Pearson Correlation Coefficient", NeurIPS 2022, Sec. 3.2, Eq. 2-3; the
    numbering is unverified, docs/methods/pkd.md)::

        s^ = standardize_channels(S),  t^ = standardize_channels(T)
        L  = 1 / (2 N C H W) * sum_{n,c,h,w} (s^ - t^)^2

    Per channel, with population standard deviations, ``sum (s^ - t^)^2 / (2 M) = 1 - r_c``
    (``M = N·H·W``, ``r_c`` the Pearson correlation of the channel's student and teacher
    values), so ``L = mean_c (1 - r_c)``; with the reference's unbiased deviations (and
    ``eps``) ``L = (1 - 1/M) · mean_c (1 - r_c)`` up to ``eps``. The teacher is detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"PKD needs equal student and teacher shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    return F.mse_loss(standardize_channels(student, eps), standardize_channels(teacher.detach(), eps)) / 2


@DISTILL_HEAD_REGISTRY.register()
class PKD(FeatureImitationHead):
    """
    PKD on the FPN levels ``IN_FEATURES``: one term per level,
    ``WEIGHT * pearson_imitation_loss(S_l, T_l)``, logged as ``loss_kd_pkd_<level>``; levels
    are summed. Defaults follow mmrazor's Faster R-CNN R101 -> R50 configuration: P2..P5
    (an empty ``IN_FEATURES`` means the RoI heads' levels, p2..p5 on an FPN Faster R-CNN, a
    RetinaNet's p3..p7), loss weight 6 per level (10 in its RetinaNet configurations).

    The student map is used as is when its channels match the teacher's (the reference has
    no connector) and resized bilinearly to the teacher's size when the two differ; a 1x1
    conv adapter (FeaturePairing) is built when the channel counts differ, or for every level
    when ``ADAPTER.ENABLED`` is True.

    Explicit construction: ``PKD(pairing=FeaturePairing(student, teacher, ["p2", "p3"],
    adapter_enabled=False), weight=6.0)`` (the adapter choice is then the caller's).
    """

    # An empty IN_FEATURES means the RoI heads' levels (p2..p5 on an FPN Faster R-CNN).
    LEVEL_SOURCE = "roi"
    pairing_from_config = staticmethod(feature_pairing_adapting_mismatched_channels)

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.PKD = CN()
        node.WEIGHT = 6.0
        add_feature_pairing_config(node)
        # False: an adapter only where the channel counts differ.
        node.ADAPTER.ENABLED = False

    @configurable
    def __init__(self, *, pairing: FeaturePairing, weight: float = 6.0):
        super().__init__(pairing=pairing, weight=weight)

    def level_loss(self, level, adapted, target):
        return pearson_imitation_loss(adapted, target)
