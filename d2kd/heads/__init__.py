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
from . import gkd  # noqa: F401  isort:skip
from . import fgfi  # noqa: F401  isort:skip
from . import defeat  # noqa: F401  isort:skip
from . import fgd  # noqa: F401  isort:skip
from . import hgd  # noqa: F401  isort:skip
from . import fbkd  # noqa: F401  isort:skip
from . import cwd  # noqa: F401  isort:skip
from . import chen2017  # noqa: F401  isort:skip
from . import dense_kd  # noqa: F401  isort:skip
from . import pkd  # noqa: F401  isort:skip
from . import mgd  # noqa: F401  isort:skip

__all__ = [
    "DISTILL_HEAD_REGISTRY",
    "TEACHER_PARTS",
    "BuildContext",
    "DistillConfigError",
    "DistillHead",
    "StepInputs",
    "build_distill_heads",
]
