"""
The teacher: its config resolved (:mod:`.config`), its weights loaded strictly
(:mod:`.weights`), its forward precision (:mod:`.precision`) and its run each step, only as
far as the heads need (:mod:`.runner`). :func:`build_teacher` puts them together.
"""

import logging
from typing import NamedTuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import nn

from .config import (
    build_teacher_cfg,
    is_lazy_config,
    lazy_teacher_cfg,
    load_lazy_teacher_config,
    resolve_teacher_config,
    teacher_run_config,
)
from .precision import TEACHER_PRECISIONS, cast_floating, teacher_autocast
from .runner import TeacherRunner
from .weights import (
    CheckpointFileError,
    TeacherWeightsError,
    format_mismatches,
    load_reporting_mismatches,
    load_teacher_weights,
    read_checkpoint_file,
)

__all__ = [
    "Teacher",
    "build_teacher",
    "build_teacher_cfg",
    "resolve_teacher_config",
    "teacher_run_config",
    "is_lazy_config",
    "load_lazy_teacher_config",
    "lazy_teacher_cfg",
    "load_teacher_weights",
    "load_reporting_mismatches",
    "format_mismatches",
    "read_checkpoint_file",
    "TeacherRunner",
    "TEACHER_PRECISIONS",
    "teacher_autocast",
    "cast_floating",
    "TeacherWeightsError",
    "CheckpointFileError",
]

logger = logging.getLogger(__name__)


class Teacher(NamedTuple):
    """
    A built teacher: ``model``, frozen and in eval mode, and ``cfg``, the config it was built
    from (input format, pixel statistics, class count and training datasets, which the heads
    and the class-order check read). ``model, cfg = build_teacher(cfg)``.
    """

    model: nn.Module
    cfg: CfgNode


def build_teacher(cfg: CfgNode) -> Teacher:
    """
    Build, load and freeze the teacher described by ``cfg.DISTILL.TEACHER``: from a YAML config,
    or instantiated from a LazyConfig (``.py``), and loaded strictly either way. Returns the
    model with its config (:class:`Teacher`).
    """
    teacher_cfg, lazy = resolve_teacher_config(cfg)
    if lazy is not None:
        from detectron2.config import instantiate

        model = instantiate(lazy.model).to(torch.device(cfg.MODEL.DEVICE))
    else:
        model = build_model(teacher_cfg)
    load_teacher_weights(model, cfg.DISTILL.TEACHER.WEIGHTS, cfg.DISTILL.TEACHER.STRICT_LOAD)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    logger.info(f"Teacher loaded from {cfg.DISTILL.TEACHER.WEIGHTS} ({cfg.DISTILL.TEACHER.CONFIG_FILE}).")
    return Teacher(model, teacher_cfg)
