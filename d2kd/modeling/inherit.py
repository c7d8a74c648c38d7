"""
The "inheriting strategy" of FGD (Yang et al., "Focal and Global Knowledge Distillation for
Detectors", CVPR 2022; ``init_student=True`` in its released code, docs/methods/inherit.md): the
student starts from the teacher's neck and heads, and learns only its backbone from scratch.

The released code copies every teacher parameter outside ``backbone.`` into the student,
loading non-strictly, so parameters whose shape differs (e.g. lateral convs fed by a narrower
backbone) keep the student's initialisation. In Detectron2 the FPN lives inside
``model.backbone`` (``backbone.fpn_*``, ``backbone.top_block``), beside the bottom-up network
(``backbone.bottom_up``), so the parts to copy are named by prefix
(``DISTILL.INHERIT.PREFIXES``) rather than by "everything but the backbone".
"""

from dataclasses import dataclass, field
from typing import List, Sequence

from torch import nn

__all__ = ["InheritReport", "InheritError", "inherit_teacher_parameters"]


class InheritError(ValueError):
    """DISTILL.INHERIT names nothing the student can take from the teacher."""


@dataclass
class InheritReport:
    """What ``inherit_teacher_parameters`` did, by state_dict key."""

    copied: List[str] = field(default_factory=list)
    wrong_shape: List[str] = field(default_factory=list)  # kept the student's initialisation
    not_in_teacher: List[str] = field(default_factory=list)  # idem

    def summary(self) -> str:
        """One line for the log."""
        line = f"copied {len(self.copied)} tensors from the teacher"
        if self.wrong_shape:
            line += f"; kept the student's own {len(self.wrong_shape)} of another shape ({self.wrong_shape[:4]} ...)"
        if self.not_in_teacher:
            line += f"; {len(self.not_in_teacher)} absent from the teacher ({self.not_in_teacher[:4]} ...)"
        return line


def inherit_teacher_parameters(student: nn.Module, teacher: nn.Module, prefixes: Sequence[str]) -> InheritReport:
    """
    Copy into ``student`` every tensor of its ``state_dict`` (parameters and buffers) whose key
    starts with one of ``prefixes`` and that the teacher has under the same key with the same
    shape. Others keep the student's values and are listed in the report.

    Raises:
        InheritError: no prefix given, or nothing matched (the models share no named part of the
            same shape: the student would silently start from scratch).
    """
    prefixes = tuple(prefixes)
    if not prefixes:
        raise InheritError("DISTILL.INHERIT.PREFIXES is empty: name the student's parts to copy, e.g. 'roi_heads.'.")
    teacher_state = teacher.state_dict()
    report = InheritReport()
    updates = {}
    for key, value in student.state_dict().items():
        if not key.startswith(prefixes):
            continue
        if key not in teacher_state:
            report.not_in_teacher.append(key)
        elif teacher_state[key].shape != value.shape:
            report.wrong_shape.append(key)
        else:
            updates[key] = teacher_state[key]  # load_state_dict copies it in place, on the student's device
            report.copied.append(key)
    if not updates:
        raise InheritError(
            f"DISTILL.INHERIT.PREFIXES {list(prefixes)} matched no tensor that the teacher has with the student's "
            f"name and shape ({len(report.wrong_shape)} of another shape, {len(report.not_in_teacher)} absent "
            "from the teacher): the student would start from scratch. Inheriting needs the same neck/head "
            "architecture in both (e.g. the same MODEL.FPN.OUT_CHANNELS and ROI box head); fix the prefixes or "
            "set DISTILL.INHERIT.ENABLED False."
        )
    student.load_state_dict(updates, strict=False)
    return report
