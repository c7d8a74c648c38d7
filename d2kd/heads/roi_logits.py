"""
Access to RoI-head classification logits of student and teacher on the same RoIs.

Shared by every head that distils the RoI head (Hinton KD, Chen et al. RCN, DeFeat, GKD):
the teacher's box head runs on the student's sampled proposals (TeacherRunner), so row i
of both logit matrices is the same RoI.
"""

from typing import List, Tuple

import torch
from detectron2.structures import Instances

from ..step import DistillConfigError

__all__ = ["RoILogitsMixin", "check_roi_logits"]

SAMPLED_PROPOSALS = "roi_heads.label_and_sample_proposals"
BOX_PREDICTOR = "roi_heads.box_predictor"


class RoILogitsMixin:
    """Declares the captures of RoI-level heads and reads their records."""

    def _require_roi_logits(self, student, teacher):
        """Check both models have RoI box heads with the same classes; declare the captures."""
        check_roi_logits(self.name, student, teacher)
        self.student_modules.append(BOX_PREDICTOR)
        self.student_methods.append(SAMPLED_PROPOSALS)
        self.teacher_modules.append(BOX_PREDICTOR)
        self.teacher_parts.add("roi_box")

    @staticmethod
    def roi_predictions(records) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(scores (R, K+1), proposal_deltas (R, 4K))`` of one model."""
        scores, deltas = records.output(BOX_PREDICTOR)
        return scores, deltas

    @staticmethod
    def sampled_proposals(student_records) -> List[Instances]:
        return student_records.output(SAMPLED_PROPOSALS)


def check_roi_logits(head_name: str, student, teacher):
    """Raise :class:`DistillConfigError` unless both models have RoI box heads with the same classes."""
    for role, model in (("student", student), ("teacher", teacher)):
        roi_heads = getattr(model, "roi_heads", None)
        if roi_heads is None or not hasattr(roi_heads, "box_predictor"):
            raise DistillConfigError(
                f"Head '{head_name}' distils the RoI box head, but the {role} "
                f"({type(model).__name__}) has none; use it with two-stage detectors "
                "(GeneralizedRCNN) or choose a feature head."
            )
    s_classes = student.roi_heads.num_classes
    t_classes = teacher.roi_heads.num_classes
    if s_classes != t_classes:
        raise DistillConfigError(
            f"Head '{head_name}' compares class scores, but the student has {s_classes} classes "
            f"and the teacher {t_classes}. Distil from a teacher trained on the same classes "
            "(MODEL.ROI_HEADS.NUM_CLASSES) or use a feature head."
        )
