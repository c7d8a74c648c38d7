"""
The teacher's weights: read from one place (:func:`read_checkpoint_file`), loaded strictly
(:func:`load_teacher_weights`), with what did not fit named (:func:`load_reporting_mismatches`).
"""

import logging
import os
from typing import Callable, Dict, List, Optional

from torch import nn

from ...files import SafeDetectionCheckpointer, UnsafeFileError

__all__ = [
    "TeacherWeightsError",
    "CheckpointFileError",
    "read_checkpoint_file",
    "load_teacher_weights",
    "load_reporting_mismatches",
    "format_mismatches",
]

logger = logging.getLogger(__name__)


class TeacherWeightsError(RuntimeError):
    """The teacher's weights are missing or do not match its architecture."""


class CheckpointFileError(RuntimeError):
    """A weights or checkpoint file exists but cannot be read (truncated, empty, not a checkpoint)."""


def read_checkpoint_file(read, path: str, option: str, advice: Optional[Callable[[], str]] = None):
    """
    ``read(path)`` (a checkpointer's ``_load_file``). A file that cannot be read (torch's
    ``PytorchStreamReader failed``, ``EOFError``, an unpickling error...) raises
    :class:`CheckpointFileError` naming ``path``, the config key or role ``option`` it came from
    (e.g. ``"DISTILL.TEACHER.WEIGHTS"``) and what to do: ``advice()`` if given (called only
    then), else to copy the file again or set ``option`` to another one.
    """
    try:
        return read(path)
    except UnsafeFileError:
        raise  # readable, and refused: its message names the file and what was refused
    except Exception as e:
        raise CheckpointFileError(
            f"{option} {path} cannot be read as a checkpoint ({type(e).__name__}: {e}). The file is damaged "
            "(truncated by an interrupted copy or a full disk, empty) or not a PyTorch/Detectron2 checkpoint. "
            + (advice() if advice else f"Copy the file again or set {option} to another checkpoint.")
        ) from e


def load_teacher_weights(teacher: nn.Module, weights: str, strict: bool = True):
    """
    Load ``weights`` (``DISTILL.TEACHER.WEIGHTS``) into ``teacher``. Missing file: error.
    Missing, unexpected or wrongly shaped parameters: error when ``strict``
    (``DISTILL.TEACHER.STRICT_LOAD``, the default), logged otherwise. A teacher is never left
    with random weights silently.
    """
    if not weights:
        raise TeacherWeightsError(
            "DISTILL.TEACHER.WEIGHTS is empty: d2kd will not distil from a randomly initialised "
            "teacher. Train the teacher first (python train_net.py --config-file <teacher.yaml>) "
            "and set DISTILL.TEACHER.WEIGHTS to its model_final.pth."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise TeacherWeightsError(
            f"Teacher weights file not found: {weights}. Set DISTILL.TEACHER.WEIGHTS to a trained "
            "teacher checkpoint (e.g. output/<teacher>/model_final.pth)."
        )
    problems = load_reporting_mismatches(teacher, weights, option="DISTILL.TEACHER.WEIGHTS")
    if problems:
        message = (
            f"Teacher weights {weights} do not match the teacher architecture: {format_mismatches(problems)}. Check "
            "DISTILL.TEACHER.CONFIG_FILE is the config the weights were trained with"
        )
        if strict:
            raise TeacherWeightsError(message + ", or set DISTILL.TEACHER.STRICT_LOAD False to load partially.")
        logger.warning(message + " (partial loading allowed by DISTILL.TEACHER.STRICT_LOAD False).")


def load_reporting_mismatches(model: nn.Module, weights: str, option: str = "Weights file") -> Dict[str, List[str]]:
    """
    Load ``weights`` into ``model`` with Detectron2's checkpointer (which loads what fits) and
    return what did not fit: ``{"missing" | "unexpected" | "wrong shape": [keys]}``, only the
    non-empty kinds. The strict checks of the teacher and of the tools' students build on it.
    An unreadable file raises :class:`CheckpointFileError` naming ``option`` (its config key).
    """
    checkpointer = _ReportingCheckpointer(model, option)
    checkpointer.load(weights)
    incompatible = checkpointer.incompatible
    problems = {
        "missing": list(incompatible.missing_keys),
        "unexpected": list(incompatible.unexpected_keys),
        "wrong shape": [k for k, _, _ in incompatible.incorrect_shapes],
    }
    return {k: v for k, v in problems.items() if v}


def format_mismatches(problems: Dict[str, List[str]]) -> str:
    """``kind (count): [first keys]`` per kind, for an error message."""
    return "; ".join(f"{k} ({len(v)}): {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())


class _ReportingCheckpointer(SafeDetectionCheckpointer):
    """
    Keeps the missing/unexpected/mis-shaped keys of the last load for the strict check; the
    file is read without running code (:mod:`d2kd.files`) through :func:`read_checkpoint_file`,
    so an unreadable one is an error naming ``option``.
    """

    def __init__(self, model: nn.Module, option: str):
        super().__init__(model)
        self.option = option
        self.incompatible = None

    def _load_file(self, f):
        return read_checkpoint_file(super()._load_file, f, self.option)

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible
