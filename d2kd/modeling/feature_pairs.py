"""
Student/teacher feature correspondence with one adapter per pair: the shared piece of every
feature-imitation head (FitNets hints, Chen et al. hints, FBKD, FGFI, DeFeat, CWD, FGD, ...).

One head spec expands over all levels, and adapters are sized from
the shapes the two models report, before the optimizer is created.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import feature_shapes, feature_source
from .adapters import FeatureAdapter

__all__ = ["FeaturePairing"]


class FeaturePairing(nn.Module):
    """
    Pairs ``student_features[i]`` with ``teacher_features[i]`` and adapts the student side.

    Args:
        student, teacher: the two models (only their reported shapes are read).
        student_features: e.g. ``["p2", "p3", "p4", "p5", "p6"]``.
        teacher_features: defaults to the same names.
        teacher_input_scale: the teacher's input resolution relative to the student's.
        adapter options: see :class:`FeatureAdapter`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_features: Sequence[str],
        teacher_features: Optional[Sequence[str]] = None,
        teacher_input_scale: float = 1.0,
        adapter_kernel: int = 1,
        adapter_enabled: bool = True,
        adapter_init_std: Optional[float] = None,
        adapter_relu: bool = False,
    ):
        super().__init__()
        student_features = list(student_features)
        teacher_features = list(teacher_features) if teacher_features else list(student_features)
        if not student_features:
            raise ValueError("A feature head needs at least one feature in IN_FEATURES.")
        if len(student_features) != len(teacher_features):
            raise ValueError(
                f"Student features {student_features} and teacher features {teacher_features} "
                "must pair one to one."
            )
        s_shapes = feature_shapes(student, student_features, "student")
        t_shapes = feature_shapes(teacher, teacher_features, "teacher")
        self.names = student_features
        self.teacher_names = dict(zip(student_features, teacher_features))
        self.teacher_input_scale = float(teacher_input_scale)
        # Input pixels (of the student's image) per cell: the student map, and the teacher map
        # on which the pair's loss is computed (what box masks are drawn on).
        self.student_strides = {n: s_shapes[n].stride for n in student_features}
        # The reported shapes of each pair (keyed by the student name), for heads sizing modules.
        self.student_channels = {n: s_shapes[n].channels for n in student_features}
        self.teacher_channels = {n: t_shapes[t].channels for n, t in self.teacher_names.items()}
        self.teacher_strides = {n: t_shapes[t].stride for n, t in self.teacher_names.items()}  # teacher's pixels
        self.target_strides = {
            n: t_shapes[t].stride / teacher_input_scale for n, t in self.teacher_names.items()
        }
        self.adapters = nn.ModuleDict()
        for s_name, t_name in self.teacher_names.items():
            s_shape, t_shape = s_shapes[s_name], t_shapes[t_name]
            # Cells per input pixel of the student image on each side.
            ratio = (t_shape.stride / teacher_input_scale) / s_shape.stride
            if not (1 / 8 <= ratio <= 8):
                raise ValueError(
                    f"Student feature '{s_name}' (stride {s_shape.stride}) cannot be aligned with "
                    f"teacher feature '{t_name}' (stride {t_shape.stride}, input scale "
                    f"{teacher_input_scale}): their resolutions differ by {ratio:g}x. Pair stages of "
                    "similar stride."
                )
            try:
                self.adapters[s_name] = FeatureAdapter(
                    s_shape.channels,
                    t_shape.channels,
                    kernel_size=adapter_kernel,
                    enabled=adapter_enabled,
                    init_std=adapter_init_std,
                    relu=adapter_relu,
                )
            except ValueError as e:
                raise ValueError(f"Feature pair {s_name} -> {t_name}: {e}") from e
        self.student_modules = sorted({feature_source(student, n, "student") for n in student_features})
        self.teacher_modules = sorted({feature_source(teacher, n, "teacher") for n in teacher_features})
        self._student_sources = {n: feature_source(student, n) for n in student_features}
        self._teacher_sources = {n: feature_source(teacher, n) for n in teacher_features}

    def student_feature(self, records, name: str) -> torch.Tensor:
        return records.output(self._student_sources[name])[name]

    def teacher_feature(self, records, name: str) -> torch.Tensor:
        t_name = self.teacher_names[name]
        return records.output(self._teacher_sources[t_name])[t_name]

    def pairs(self, student_records, teacher_records) -> List[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each pair: ``(name, adapted student, teacher, raw student)``, sizes aligned."""
        out = []
        for name in self.names:
            s = self.student_feature(student_records, name)
            t = self.teacher_feature(teacher_records, name)
            adapted, t = self.align(name, s, t)
            out.append((name, adapted, t, s))
        return out

    def align(self, name: str, student_map: torch.Tensor, teacher_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        ``(adapted student map, teacher map)`` of pair ``name``, of equal size, cell for cell
        over the same image extent (the adapter runs before the resize). See ``match_extent``.
        """
        size, (h, w) = self._target_size(name, student_map, teacher_map)
        return self.adapters[name](student_map, size=size)[..., :h, :w], teacher_map[..., :h, :w]

    def match_extent(self, name: str, student_map: torch.Tensor, teacher_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        ``(un-adapted student map, teacher map)`` of equal size over the same image extent,
        for heads that read the raw student map (attention, non-local blocks). With
        ``teacher_input_scale`` 1 the student map is resized to the teacher's (its size when
        the strides agree). Otherwise the two batches were padded separately (each to its own
        size divisibility, after the teacher's resize), so the maps span different extents of
        the image: the student map is resized to the teacher cells spanning the same pixels,
        and both are cut to the extent they share (top-left aligned, as the images are).
        """
        size, (h, w) = self._target_size(name, student_map, teacher_map)
        if tuple(student_map.shape[-2:]) != tuple(size):
            student_map = F.interpolate(student_map, size=size, mode="bilinear", align_corners=False)
        return student_map[..., :h, :w], teacher_map[..., :h, :w]

    def _target_size(self, name, student_map, teacher_map):
        if self.teacher_input_scale == 1.0:
            size = tuple(teacher_map.shape[-2:])
        else:
            size = self.corresponding_size(name, student_map.shape[-2:])
        shared = (min(size[0], teacher_map.shape[-2]), min(size[1], teacher_map.shape[-1]))
        return size, shared

    def corresponding_size(self, name: str, student_hw) -> Tuple[int, int]:
        """The number of teacher cells spanning the pixels a student map of ``student_hw`` spans."""
        cells = self.student_strides[name] / self.target_strides[name]  # teacher cells per student cell
        return tuple(max(1, int(round(n * cells))) for n in student_hw)


def add_feature_pairing_config(node, in_features=(), kernel_size=1, init_std=0.0, relu=False):
    """
    Add the options of a :class:`FeaturePairing` to a head's config node:
    ``IN_FEATURES`` (empty: the levels the student's detector reads, filled in when the head is
    built: ``DistillHead.options(cfg, context)``), ``TEACHER_FEATURES`` (empty: same names) and
    ``ADAPTER.{ENABLED, KERNEL_SIZE, INIT_STD (0 = PyTorch default), RELU}``.
    """
    from detectron2.config import CfgNode as CN

    node.IN_FEATURES = list(in_features)
    node.TEACHER_FEATURES = []
    node.ADAPTER = CN()
    node.ADAPTER.ENABLED = True
    node.ADAPTER.KERNEL_SIZE = kernel_size
    node.ADAPTER.INIT_STD = init_std
    node.ADAPTER.RELU = relu


def feature_pairing_adapting_mismatched_channels(node, context, cfg) -> FeaturePairing:
    """
    :func:`feature_pairing_from_config` whose adapters are on only when some student/teacher pair
    differs in channels (``ADAPTER.ENABLED`` False otherwise): for losses that compare the raw
    maps (CWD, PKD, MGD), an adapter is the channel alignment, not part of the method.
    """
    node = node.clone()
    node.defrost()
    teacher_names = list(node.TEACHER_FEATURES) or list(node.IN_FEATURES)
    if len(teacher_names) == len(node.IN_FEATURES):
        s_shapes = feature_shapes(context.student, node.IN_FEATURES, "student")
        t_shapes = feature_shapes(context.teacher, teacher_names, "teacher")
        if any(s_shapes[s].channels != t_shapes[t].channels for s, t in zip(node.IN_FEATURES, teacher_names)):
            node.ADAPTER.ENABLED = True
    return feature_pairing_from_config(node, context, cfg)


def feature_pairing_from_config(node, context, cfg) -> FeaturePairing:
    """Build the :class:`FeaturePairing` that ``add_feature_pairing_config`` describes."""
    return FeaturePairing(
        context.student,
        context.teacher,
        node.IN_FEATURES,
        node.TEACHER_FEATURES,
        teacher_input_scale=cfg.DISTILL.TEACHER.INPUT_SCALE,
        adapter_kernel=node.ADAPTER.KERNEL_SIZE,
        adapter_enabled=node.ADAPTER.ENABLED,
        adapter_init_std=node.ADAPTER.INIT_STD or None,
        adapter_relu=node.ADAPTER.RELU,
    )
