"""
Access to the RPN's per-anchor outputs of student and teacher on the student's sampled anchors.

Shared by heads that distil the region proposal network (Chen et al. 2017 RPN soft labels and
bounded regression; the same layout serves dense heads such as RetinaNet's). The teacher's
RPN head runs on the teacher's own features (TeacherRunner part ``"rpn"``); when both models
have the same anchor generator and input resolution, anchor ``a`` of the flattened outputs is
the same box in both, so the student's sampled anchors index the teacher's outputs directly.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from detectron2.layers import cat

from ..step import DistillConfigError

__all__ = [
    "RPNOutputsMixin",
    "SampledAnchors",
    "flatten_dense_predictions",
    "check_rpn_outputs",
    "check_same_anchors",
]

RPN_HEAD = "proposal_generator.rpn_head"
SAMPLED_ANCHORS = "proposal_generator.label_and_sample_anchors"


def flatten_dense_predictions(per_level: List[torch.Tensor], values_per_anchor: int) -> torch.Tensor:
    """
    Per-level ``(N, A*D, H, W)`` maps -> ``(N, sum_l H_l*W_l*A, D)``, in the anchor order of
    Detectron2's anchor generators (and of ``RPN.forward`` / ``RetinaNet``): level, then
    y, x, then anchor.
    """
    flat = []
    for x in per_level:
        n, _, h, w = x.shape
        flat.append(x.view(n, -1, values_per_anchor, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, values_per_anchor))
    return cat(flat, dim=1)


def check_same_anchors(head_name: str, outputs: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Per-anchor outputs of student and teacher (``(images, anchors, ...)``, flattened by
    :func:`flatten_dense_predictions`) must cover the same anchors; they do not when the two
    models saw differently padded images."""
    if student.shape != teacher.shape:
        raise RuntimeError(
            f"Head '{head_name}': the teacher's {outputs} scored {tuple(teacher.shape)} (images, anchors, ...) and "
            f"the student's {tuple(student.shape)}; both must see the same padded images (same "
            "SIZE_DIVISIBILITY, DISTILL.TEACHER.INPUT_SCALE 1.0)."
        )


@dataclass
class SampledAnchors:
    """What the student's RPN sampled in this step (``label_and_sample_anchors``)."""

    anchors: torch.Tensor  # (R, 4): every anchor of the image grid, all levels
    labels: torch.Tensor  # (N, R): 1 positive, 0 negative, -1 not sampled
    matched_gt_boxes: torch.Tensor  # (N, R, 4): meaningful where labels == 1

    @property
    def sampled(self) -> torch.Tensor:
        return self.labels >= 0

    @property
    def positive(self) -> torch.Tensor:
        return self.labels == 1


class RPNOutputsMixin:
    """Declares the captures of RPN-level heads, checks the two RPNs correspond, reads records."""

    def _require_rpn_outputs(self, student, teacher, teacher_input_scale: float = 1.0):
        """Check the two RPNs correspond (anchor by anchor); declare the captures."""
        check_rpn_outputs(self.name, student, teacher, teacher_input_scale)
        self.student_modules.append(RPN_HEAD)
        self.student_methods.append(SAMPLED_ANCHORS)
        self.teacher_modules.append(RPN_HEAD)
        self.teacher_parts.add("rpn")

    @staticmethod
    def rpn_predictions(records, box_dim: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(objectness logits (N, R), anchor deltas (N, R, box_dim))`` of one model."""
        objectness, deltas = records.output(RPN_HEAD)
        return flatten_dense_predictions(objectness, 1).squeeze(2), flatten_dense_predictions(deltas, box_dim)

    @staticmethod
    def sampled_anchors(student_records) -> SampledAnchors:
        """The student's anchors (the exact ones it labelled) and its sampled labels."""
        anchors, _ = student_records.inputs(SAMPLED_ANCHORS)[:2]
        labels, matched = student_records.output(SAMPLED_ANCHORS)
        return SampledAnchors(
            anchors=type(anchors[0]).cat(anchors).tensor,
            labels=torch.stack(labels),
            matched_gt_boxes=torch.stack(matched),
        )


def check_rpn_outputs(head_name: str, student, teacher, teacher_input_scale: float = 1.0):
    """Raise :class:`DistillConfigError` unless both models have Detectron2 RPNs with the same
    anchors, seeing the same resolution."""
    for role, model in (("student", student), ("teacher", teacher)):
        rpn = getattr(model, "proposal_generator", None)
        needed = ("rpn_head", "anchor_generator", "label_and_sample_anchors")
        if rpn is None or not all(hasattr(rpn, a) for a in needed):
            raise DistillConfigError(
                f"Head '{head_name}' distils the RPN, but the {role} ({type(model).__name__}) has no "
                f"Detectron2 RPN (proposal generator: {type(rpn).__name__}). Use two-stage detectors with "
                "MODEL.PROPOSAL_GENERATOR.NAME 'RPN', or turn the head's RPN part off."
            )
    if teacher_input_scale != 1.0:
        raise DistillConfigError(
            f"Head '{head_name}' distils the RPN anchor by anchor, which needs teacher and student "
            f"to see the same resolution, but DISTILL.TEACHER.INPUT_SCALE is {teacher_input_scale}. "
            "Set it to 1.0 or turn the head's RPN part off."
        )
    s_gen = student.proposal_generator.anchor_generator
    t_gen = teacher.proposal_generator.anchor_generator
    s_desc, t_desc = _anchor_grid(s_gen), _anchor_grid(t_gen)
    same_cells = len(s_gen.cell_anchors) == len(t_gen.cell_anchors) and all(
        torch.equal(a.cpu(), b.cpu()) for a, b in zip(s_gen.cell_anchors, t_gen.cell_anchors)
    )
    if s_desc != t_desc or not same_cells:
        raise DistillConfigError(
            f"Head '{head_name}' compares RPN outputs anchor by anchor, but the anchors differ: "
            f"student {s_desc}, teacher {t_desc}"
            f"{'' if same_cells else ', cell anchors (sizes/aspect ratios) differ'}. Give both models the "
            "same MODEL.ANCHOR_GENERATOR and MODEL.RPN.IN_FEATURES strides (DISTILL.TEACHER.OPTS can "
            "override the teacher's), or turn the head's RPN part off."
        )


def _anchor_grid(generator) -> dict:
    return {
        "strides": list(generator.strides),
        "anchors per cell": list(generator.num_anchors),
        "offset": float(generator.offset),
        "box dim": int(generator.box_dim),
    }
