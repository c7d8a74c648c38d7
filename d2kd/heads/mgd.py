"""MGD, masked generative distillation (Yang et al., ECCV 2022; docs/methods/mgd.md)."""

from typing import Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import nn

from ..modeling.feature_pairs import (
    FeaturePairing,
    add_feature_pairing_config,
    feature_pairing_adapting_mismatched_channels,
)
from .base import DISTILL_HEAD_REGISTRY, DistillConfigError
from .feature_imitation import FeatureImitationHead

__all__ = ["MGD", "MGDGenerator", "random_spatial_mask", "generation_distance"]


def random_spatial_mask(
    batch: int,
    height: int,
    width: int,
    ratio: float,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """
    MGD's random mask (Yang et al., "Masked Generative Distillation", ECCV 2022, Sec. 3.2,
    Eq. 2): a ``(batch, 1, height, width)`` map of 0 (masked) and 1 (kept), shared by all
    channels of a position; each position is masked with probability ``ratio`` (λ)::

        R ~ U(0, 1)^{N x 1 x H x W},   M = 0 where R > 1 - λ, else 1

    (the reference code's rule; the paper's ``R < λ`` has the same distribution). ``R`` is
    drawn in float32 from ``generator`` (default: the global generator of ``device``, so
    ``torch.manual_seed`` makes it reproducible) and the mask is returned on ``device`` in
    ``dtype``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"The MGD mask ratio must be in [0, 1], got {ratio}.")
    shape = (batch, 1, height, width)
    if generator is not None:
        draws = torch.rand(shape, generator=generator, device=generator.device)
    else:
        draws = torch.rand(shape, device=device)
    return (draws <= 1.0 - ratio).to(device=device, dtype=dtype)


class MGDGenerator(nn.Sequential):
    """
    The generation block ``G`` (Yang et al. 2022, Sec. 3.2, Eq. 3): ``conv3x3 -> ReLU ->
    conv3x3``, both ``C_T -> C_T`` with bias, PyTorch's default initialisation (as the
    reference).
    """

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )


def generation_distance(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """
    MGD's distillation distance of one level (Yang et al. 2022, Sec. 3.2, Eq. 4), normalised
    as the reference code (a sum over ``C·H·W`` and the batch, divided by the batch size ``N``)::

        L_dis = 1/N * sum_{n,c,h,w} (T - G(f_align(S) · M))^2

    ``generated`` is ``G(f_align(S) · M)``. The teacher is detached. The sum is taken in
    float32 (a sum over ``C·H·W`` squares overflows half precision).
    """
    if generated.shape != teacher.shape:
        raise ValueError(
            f"MGD needs equal generated and teacher shapes, got {tuple(generated.shape)} and {tuple(teacher.shape)}."
        )
    diff = generated.float() - teacher.detach().float()
    return (diff * diff).sum() / teacher.shape[0]


@DISTILL_HEAD_REGISTRY.register()
class MGD(FeatureImitationHead):
    """
    Masked generative distillation of the FPN levels ``IN_FEATURES`` (Yang et al. 2022,
    Sec. 3.2, Eq. 2-5). Per level ``l``: the (aligned) student map is masked at random
    positions (ratio ``LAMBDA``, :func:`random_spatial_mask`), a generation block
    (:class:`MGDGenerator`, one per level, trained with the student) maps it to the teacher's
    map, and the term is ``ALPHA * generation_distance(G_l(S_l · M), T_l)``, logged as
    ``loss_kd_mgd_<level>``; levels are summed (Eq. 5: ``L = L_original + α L_dis``).

    Defaults follow the official two-stage detection configurations (Faster/Mask R-CNN:
    α 5e-7, λ 0.45, P2..P5; an empty ``IN_FEATURES`` means the RoI heads' levels, p2..p5 on an
    FPN Faster R-CNN, a RetinaNet's p3..p7); its one-stage ones (RetinaNet, RepPoints, and
    mmrazor's RetinaNet configuration) use α 2e-5, λ 0.65 on P3..P7.

    ``f_align`` is the identity when the channel counts match, else a 1x1 conv (the
    reference's align conv), built for every level when ``ADAPTER.ENABLED`` is True; the
    student map is resized bilinearly to the teacher's size when the two differ. A fresh mask
    is drawn per level and step from the global generator of the feature's device.

    Explicit construction: ``MGD(pairing=FeaturePairing(student, teacher, ["p2", "p3"],
    adapter_enabled=False), alpha=5e-7, lam=0.45)`` (``alpha`` is the head's ``weight``); the
    generation blocks are sized from the pairing's teacher channels.
    """

    # An empty IN_FEATURES means the RoI heads' levels (p2..p5 on an FPN Faster R-CNN).
    LEVEL_SOURCE = "roi"
    pairing_from_config = staticmethod(feature_pairing_adapting_mismatched_channels)

    @classmethod
    def add_config(cls, cfg):
        node = cfg.DISTILL.MGD = CN()
        node.ALPHA = 5e-7  # α_mgd, the weight of every level's distance
        node.LAMBDA = 0.45  # λ_mgd, the fraction of positions masked
        add_feature_pairing_config(node)
        # False: an align conv only where the channel counts differ (the reference's rule).
        node.ADAPTER.ENABLED = False

    @configurable
    def __init__(self, *, pairing: FeaturePairing, alpha: float = 5e-7, lam: float = 0.45):
        if not 0.0 <= lam <= 1.0:
            raise DistillConfigError(f"DISTILL.MGD.LAMBDA (the masked fraction) must be in [0, 1], got {lam}.")
        super().__init__(pairing=pairing, weight=alpha)
        self.lam = lam
        self.generators = nn.ModuleDict(
            {name: MGDGenerator(self.pairing.teacher_channels[name]) for name in self.pairing.names}
        )

    @classmethod
    def loss_options(cls, opts):
        return {"alpha": opts.ALPHA, "lam": opts.LAMBDA}

    def mask(self, feature: torch.Tensor) -> torch.Tensor:
        """The random mask of an aligned ``(N, C, H, W)`` student map, on its device and in its dtype."""
        n, _, h, w = feature.shape
        return random_spatial_mask(n, h, w, self.lam, device=feature.device, dtype=feature.dtype)

    def level_loss(self, level, aligned, target):
        return generation_distance(self.generators[level](aligned * self.mask(aligned)), target)
