"""Running the frozen teacher each step, only as far as the heads need."""

from typing import List, Optional, Set

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList
from torch import nn

from ...capture import Recorder, Records
from .precision import cast_floating, teacher_autocast

__all__ = ["TeacherRunner"]


class TeacherRunner:
    """
    Runs only the teacher parts the heads need, under ``no_grad`` and in eval mode, on the
    same batch as the student, with the teacher's own pixel mean/std and channel order.

    The forward runs in ``precision`` (``DISTILL.TEACHER.PRECISION``, :func:`teacher_autocast`);
    whatever it ran in, the records handed to the heads hold fp32 tensors.

    Args:
        teacher: the frozen teacher.
        parts: subset of ``{"backbone", "rpn", "roi_box", "dense"}``.
        recorder: the teacher's recorder (hooks on the modules the heads read).
        student_input_format: the channel order of ``batched_inputs["image"]``.
        input_scale: teacher input resolution / student input resolution.
        precision: ``DISTILL.TEACHER.PRECISION`` ("" | "fp32" | "bf16" | "fp16").
    """

    def __init__(
        self,
        teacher: nn.Module,
        parts: Set[str],
        recorder: Recorder,
        student_input_format: str,
        input_scale: float = 1.0,
        precision: str = "",
    ):
        self.teacher = teacher
        self.parts = set(parts)
        if self.parts & {"rpn", "roi_box", "dense"}:
            self.parts.add("backbone")
        self.recorder = recorder
        self.flip_channels = _needs_channel_flip(student_input_format, getattr(teacher, "input_format", student_input_format))
        self.input_scale = float(input_scale)
        teacher_autocast(precision, "cpu")  # validates the option at build time
        self.precision = precision

    @property
    def needs_student_records(self) -> bool:
        """True when the teacher reads the student's step (its box head on the student's RoIs)."""
        return "roi_box" in self.parts

    def preprocess(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise with the teacher's statistics and pad with its size divisibility."""
        teacher = self.teacher
        images = []
        for x in batched_inputs:
            image = x["image"].to(teacher.pixel_mean.device)
            if self.flip_channels:
                image = image.flip(0)
            image = (image - teacher.pixel_mean) / teacher.pixel_std
            if self.input_scale != 1.0:
                image = F.interpolate(image[None], scale_factor=self.input_scale, mode="bilinear", align_corners=False)[0]
            images.append(image)
        return ImageList.from_tensors(
            images,
            teacher.backbone.size_divisibility,
            padding_constraints=getattr(teacher.backbone, "padding_constraints", None),
        )

    @torch.no_grad()
    def __call__(self, batched_inputs: List[dict], student_records: Optional[Records]):
        """Returns ``(teacher records, teacher ImageList)``; empty records if no part is needed."""
        if not self.parts:
            return Records({}), None
        teacher = self.teacher
        teacher.eval()  # re-applied every step: a trainer's train() must never reach it
        images = self.preprocess(batched_inputs)
        with self.recorder.recording(), teacher_autocast(self.precision, images.tensor.device.type):
            features = teacher.backbone(images.tensor)
            if "rpn" in self.parts:
                rpn = teacher.proposal_generator
                teacher_rpn_features = [features[f] for f in rpn.in_features]
                rpn.anchor_generator(teacher_rpn_features)
                rpn.rpn_head(teacher_rpn_features)
            if "roi_box" in self.parts:
                self._run_box_head_on_student_proposals(features, student_records)
            if "dense" in self.parts:
                self._run_dense_head(features)
        return _records_to_float32(self.recorder.pop()), images

    def _run_dense_head(self, features):
        """A one-stage teacher (RetinaNet): its dense head and anchors, no decoding or NMS."""
        teacher = self.teacher
        dense_features = [features[f] for f in teacher.head_in_features]
        teacher.anchor_generator(dense_features)
        teacher.head(dense_features)

    def _run_box_head_on_student_proposals(self, features, student_records: Records):
        """
        The teacher's box head on the student's sampled proposals, so that its RoI logits
        correspond one to one with the student's (Chen et al. 2017).
        """
        roi_heads = self.teacher.roi_heads
        proposals = student_records.output("roi_heads.label_and_sample_proposals")
        boxes = [p.proposal_boxes for p in proposals]
        if self.input_scale != 1.0:
            boxes = [Boxes(b.tensor * self.input_scale) for b in boxes]
        box_features = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        box_features = roi_heads.box_head(box_features)
        roi_heads.box_predictor(box_features)


def _records_to_float32(records: Records) -> Records:
    """The teacher's records with their floating tensors in fp32 (what every head expects)."""
    data = records._data  # Records has no public iteration; it is d2kd's own type
    return Records({k: [cast_floating(entry, torch.float32) for entry in entries] for k, entries in data.items()})


def _needs_channel_flip(student_format: str, teacher_format: str) -> bool:
    formats = {student_format, teacher_format}
    if student_format == teacher_format:
        return False
    if formats == {"RGB", "BGR"}:
        return True
    raise ValueError(
        f"Cannot feed a teacher expecting {teacher_format} images from a student loader producing "
        f"{student_format}; d2kd converts between RGB and BGR only."
    )
