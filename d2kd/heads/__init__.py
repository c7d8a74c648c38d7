"""Distillation heads. Importing this package registers the built-in ones."""

from .base import (
    DISTILL_HEAD_REGISTRY,
    TEACHER_PARTS,
    BuildContext,
    DistillConfigError,
    DistillHead,
    StepInputs,
    build_distill_heads,
)

# Built-in heads (one method per file).
from . import fitnet  # noqa: F401  isort:skip
from . import kd  # noqa: F401  isort:skip

__all__ = [
    "DISTILL_HEAD_REGISTRY",
    "TEACHER_PARTS",
    "BuildContext",
    "DistillConfigError",
    "DistillHead",
    "StepInputs",
    "build_distill_heads",
]
