"""
The shared part of the feature heads whose methods differ only in the loss on one pair of
feature maps (FitNets, CWD, PKD, MGD): the student/teacher :class:`FeaturePairing`, what it
records, the loop over the paired levels and the reading of the pairing's options.

A new method of this kind is its loss plus its options::

    @DISTILL_HEAD_REGISTRY.register()
    class L1Hint(FeatureImitationHead):
        @classmethod
        def add_config(cls, cfg):
            cfg.DISTILL.L1HINT = CN({"WEIGHT": 1.0})
            add_feature_pairing_config(cfg.DISTILL.L1HINT)

        def level_loss(self, level, adapted, target):
            return (adapted - target.detach()).abs().mean()
"""

from typing import Dict

import torch
from detectron2.config import configurable

from ..modeling.feature_pairs import FeaturePairing, feature_pairing_from_config
from .base import DistillHead

__all__ = ["FeatureImitationHead"]


class FeatureImitationHead(DistillHead):
    """
    One term per paired level ``l`` of ``pairing`` (:class:`FeaturePairing`), levels summed::

        terms[l] = weight * level_loss(l, f_l(S_l), T_l)

    logged as ``loss_kd_<name>_<l>``; ``f_l`` is the pairing's adapter and the two maps have
    the teacher's size (:meth:`FeaturePairing.pairs`).

    Subclasses define :meth:`level_loss` and ``add_config`` (with
    :func:`~d2kd.modeling.feature_pairs.add_feature_pairing_config`); one with options besides
    ``WEIGHT`` also has a ``@configurable __init__`` that checks them and calls
    ``super().__init__(pairing=pairing, weight=weight)``, and a :meth:`loss_options` that reads
    them. ``pairing_from_config`` builds the pairing from ``IN_FEATURES``, ``TEACHER_FEATURES``
    and ``ADAPTER``: :func:`~d2kd.modeling.feature_pairs.feature_pairing_from_config` (the
    adapter is part of the method, e.g. FitNets' regressor) or
    :func:`~d2kd.modeling.feature_pairs.feature_pairing_adapting_mismatched_channels` (the
    loss compares the raw maps; an adapter only aligns differing channel counts).
    """

    pairing_from_config = staticmethod(feature_pairing_from_config)

    @configurable
    def __init__(self, *, pairing: FeaturePairing, weight: float = 1.0):
        super().__init__()
        self.weight = weight
        self.pairing = pairing
        self.capture_pairing(self.pairing)

    @classmethod
    def from_config(cls, cfg, context):
        opts = cls.options(cfg, context)
        return {"pairing": cls.pairing_from_config(opts, context, cfg), **cls.loss_options(opts)}

    @classmethod
    def loss_options(cls, opts) -> Dict:
        """The keyword arguments of ``__init__`` other than ``pairing``, read from ``cfg.DISTILL.<NAME>``."""
        return {"weight": opts.WEIGHT}

    def level_loss(self, level: str, adapted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of level ``level``: adapted student map and teacher map, of equal size."""
        raise NotImplementedError

    def forward(self, student, teacher, step) -> Dict[str, torch.Tensor]:
        return {
            level: self.weight * self.level_loss(level, adapted, target)
            for level, adapted, target, _ in self.pairing.pairs(student, teacher)
        }
