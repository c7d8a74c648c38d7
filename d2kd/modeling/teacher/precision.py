"""
The teacher's forward precision (``DISTILL.TEACHER.PRECISION``) and the cast of what it
returns back to fp32 for the heads.
"""

import contextlib
from typing import Any

import torch
from detectron2.structures import Boxes, ImageList, Instances

__all__ = ["TEACHER_PRECISIONS", "teacher_autocast", "cast_floating"]

# DISTILL.TEACHER.PRECISION -> the teacher's autocast dtype ("": the step's own precision).
TEACHER_PRECISIONS = {
    "": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def teacher_autocast(precision: str, device_type: str):
    """
    The context the teacher's forward runs in for ``DISTILL.TEACHER.PRECISION``: the step's
    own (``""``), autocast off (``"fp32"``), or autocast in bf16 / fp16 on ``device_type``.
    """
    key = str(precision).strip().lower()
    if key not in TEACHER_PRECISIONS:
        raise ValueError(
            f"DISTILL.TEACHER.PRECISION {precision!r} is not a precision; choose one of "
            f"{sorted(k for k in TEACHER_PRECISIONS if k)} or \"\" (the training step's)."
        )
    dtype = TEACHER_PRECISIONS[key]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def cast_floating(obj: Any, dtype: torch.dtype = torch.float32) -> Any:
    """
    ``obj`` with every floating tensor in it cast to ``dtype`` (tensors, dicts, lists, tuples,
    ``Boxes``, ``Instances``, ``ImageList``); other values are returned as they are. Casting a
    tensor already of ``dtype`` returns it (no copy).
    """
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        return type(obj)((k, cast_floating(v, dtype)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_floating(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floating(v, dtype) for v in obj)
    if isinstance(obj, Boxes):
        return type(obj)(cast_floating(obj.tensor, dtype))
    if isinstance(obj, ImageList):
        return ImageList(cast_floating(obj.tensor, dtype), obj.image_sizes)
    if isinstance(obj, Instances):
        out = Instances(obj.image_size)
        for k, v in obj.get_fields().items():
            out.set(k, cast_floating(v, dtype))
        return out
    return obj
