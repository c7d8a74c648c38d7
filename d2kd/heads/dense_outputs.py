"""
Access to a one-stage (RetinaNet-style) detector's dense outputs, for student and teacher.

Shared by the heads that distil the dense head of Detectron2's ``RetinaNet`` (``dense_kd``;
the Global Knowledge response term on positive anchors). The teacher's ``head`` runs on the
teacher's own features at its ``head_in_features`` (TeacherRunner part ``"dense"``). When both
models have the same anchor grid and see the same resolution, anchor ``a`` of the flattened
outputs is the same box in both, so the student's anchor labels index the teacher's outputs::

    class MyHead(DenseOutputsMixin, DistillHead):
        @configurable
        def __init__(self, *, student, teacher, teacher_input_scale: float = 1.0):
            super().__init__()
            self._require_dense_outputs(student, teacher, teacher_input_scale)

        @classmethod
        def from_config(cls, cfg, context):
            return {"student": context.student, "teacher": context.teacher,
                    "teacher_input_scale": cfg.DISTILL.TEACHER.INPUT_SCALE}

        def forward(self, student, teacher, step):
            s_logits, t_logits = self.paired_dense_logits(student, teacher)  # (N, R, K) each, shapes checked
            labels = self.anchor_labels(student)  # (N, R): -1 ignored, 0..K-1 class, K background
            positive = (labels >= 0) & (labels != self.num_classes)
            ...

Anchors are ordered level by level, then ``(y, x, anchor)``, as Detectron2's anchor
generators and ``RetinaNet.label_anchors`` order them.
"""

from typing import List, Tuple

import torch
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

from ..step import DistillConfigError
from .rpn_outputs import check_same_anchors

__all__ = ["DenseOutputsMixin", "is_dense_detector"]

DENSE_HEAD = "head"
LABEL_ANCHORS = "label_anchors"
ANCHOR_GENERATOR = "anchor_generator"


def is_dense_detector(model) -> bool:
    """A Detectron2 ``DenseDetector`` with anchors and a class count (RetinaNet)."""
    return all(hasattr(model, a) for a in ("head", "head_in_features", "anchor_generator", "num_classes"))


def _anchor_grid(generator) -> dict:
    return {
        "strides": [int(s) for s in generator.strides],
        "anchors per cell": list(generator.num_anchors),
        "offset": float(generator.offset),
    }


class DenseOutputsMixin:
    """Declares the captures of dense-head heads, checks the two dense heads correspond, reads records."""

    def _require_dense_outputs(self, student, teacher, teacher_input_scale: float = 1.0, anchor_labels: bool = True):
        """
        Check student and teacher are both RetinaNet-style detectors with the same classes,
        levels and anchors, seeing the same resolution; declare the captures: both models'
        ``head`` (and the teacher part ``"dense"``), the student's ``label_anchors`` if
        ``anchor_labels`` (its matching of anchors to ground truth), and both anchor generators.
        """
        for role, model in (("student", student), ("teacher", teacher)):
            if not is_dense_detector(model):
                raise DistillConfigError(
                    f"Head '{self.name}' distils the dense (per-anchor) head of one-stage detectors, but the "
                    f"{role} ({type(model).__name__}) has none. Use RetinaNet student and teacher "
                    "(MODEL.META_ARCHITECTURE 'RetinaNet'), or a feature head (e.g. fitnet) for other pairs."
                )
        if student.num_classes != teacher.num_classes:
            raise DistillConfigError(
                f"Head '{self.name}' compares class logits anchor by anchor, but the student has "
                f"{student.num_classes} classes and the teacher {teacher.num_classes}. Distil from a teacher "
                "trained on the same classes (MODEL.RETINANET.NUM_CLASSES) or use a feature head."
            )
        if teacher_input_scale != 1.0:
            raise DistillConfigError(
                f"Head '{self.name}' compares dense outputs anchor by anchor, which needs teacher and student "
                f"to see the same resolution, but DISTILL.TEACHER.INPUT_SCALE is {teacher_input_scale}. Set it "
                "to 1.0 or use a feature head."
            )
        s_gen, t_gen = student.anchor_generator, teacher.anchor_generator
        s_desc, t_desc = _anchor_grid(s_gen), _anchor_grid(t_gen)
        same_cells = len(s_gen.cell_anchors) == len(t_gen.cell_anchors) and all(
            a.shape == b.shape and torch.allclose(a.cpu(), b.cpu()) for a, b in zip(s_gen.cell_anchors, t_gen.cell_anchors)
        )
        if s_desc != t_desc or not same_cells:
            raise DistillConfigError(
                f"Head '{self.name}' compares dense outputs anchor by anchor, but the anchors differ: student "
                f"{s_desc} on {list(student.head_in_features)}, teacher {t_desc} on "
                f"{list(teacher.head_in_features)}{'' if same_cells else '; cell anchors (sizes/aspect ratios) differ'}. "
                "Give both models the same MODEL.ANCHOR_GENERATOR and head levels (DISTILL.TEACHER.OPTS can "
                "override the teacher's anchors; the anchor count per cell must stay that of its weights)."
            )
        self.num_classes = student.num_classes
        self.dense_levels = list(student.head_in_features)
        self.student_modules += [DENSE_HEAD, ANCHOR_GENERATOR]
        self.teacher_modules += [DENSE_HEAD, ANCHOR_GENERATOR]
        if anchor_labels:
            self.student_methods.append(LABEL_ANCHORS)
        self.teacher_parts.add("dense")

    @staticmethod
    def dense_predictions(records, num_classes: int, box_dim: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(class logits (N, R, K), anchor deltas (N, R, box_dim))`` of one model, all levels."""
        logits, deltas = records.output(DENSE_HEAD)
        return (
            cat([permute_to_N_HWA_K(x, num_classes) for x in logits], dim=1),
            cat([permute_to_N_HWA_K(x, box_dim) for x in deltas], dim=1),
        )

    def paired_dense_logits(self, student, teacher) -> Tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's class logits ``(N, R, K)``, checked to cover the same
        anchors (they do not when the two models saw differently padded images)."""
        student_logits, _ = self.dense_predictions(student, self.num_classes)
        teacher_logits, _ = self.dense_predictions(teacher, self.num_classes)
        check_same_anchors(self.name, "dense head", student_logits, teacher_logits)
        return student_logits, teacher_logits

    @staticmethod
    def dense_level_sizes(records) -> List[int]:
        """Anchors per level (``H_l * W_l * A``), to split the flattened outputs by level."""
        return [len(b) for b in records.output(ANCHOR_GENERATOR)]

    @staticmethod
    def anchor_labels(student_records) -> torch.Tensor:
        """The student's anchor labels ``(N, R)``: -1 ignored, ``0..K-1`` class, ``K`` background."""
        labels, _ = student_records.output(LABEL_ANCHORS)
        return torch.stack(labels)

    @staticmethod
    def matched_gt_boxes(student_records) -> torch.Tensor:
        """``(N, R, 4)`` GT box matched to each anchor (meaningful where the label is a class)."""
        _, boxes = student_records.output(LABEL_ANCHORS)
        return torch.stack(boxes)

    @staticmethod
    def anchors(records) -> torch.Tensor:
        """``(R, 4)`` the anchors of all levels (the same for every image of the batch)."""
        boxes = records.output(ANCHOR_GENERATOR)
        return type(boxes[0]).cat(boxes).tensor
