"""
The vocabulary one distillation step passes around, shared by the heads, the distillation
model and the trainer without any of them importing another.

- :data:`TEACHER_PARTS`: what a head may ask the teacher to run;
- :class:`BuildContext`: what a head may look at while it is built;
- :class:`StepInputs`: the data of one training step that is not a recorded output;
- :class:`DistillConfigError`: a distillation setup that cannot work, raised before training.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.structures import ImageList, Instances
from torch import nn

__all__ = ["TEACHER_PARTS", "BuildContext", "StepInputs", "DistillConfigError"]

# What a head may ask the teacher to run (the teacher runs only the parts some head needs):
#   "backbone": backbone (+FPN) features only;
#   "rpn":      the RPN head on the teacher's features (logits and deltas at every anchor);
#   "roi_box":  the teacher's box pooler/head/predictor on the STUDENT's sampled proposals;
#   "dense":    a one-stage teacher's dense head (RetinaNet ``head``) on its ``head_in_features``,
#               and its ``anchor_generator``.
TEACHER_PARTS = ("backbone", "rpn", "roi_box", "dense")


class DistillConfigError(ValueError):
    """A distillation config that cannot work; raised while building, before training."""


@dataclass
class BuildContext:
    """What a head may look at while it is built (before the optimizer exists)."""

    student: nn.Module
    teacher: nn.Module
    student_cfg: CfgNode
    teacher_cfg: CfgNode


@dataclass
class StepInputs:
    """The data of one training step that is not a recorded output."""

    batched_inputs: List[dict]
    gt_instances: List[Instances]
    student_images: ImageList
    teacher_images: Optional[ImageList]
    iteration: int
    extra: Dict = field(default_factory=dict)
