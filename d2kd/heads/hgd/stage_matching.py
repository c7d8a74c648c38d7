"""
Correspondence between the stages of a student and a teacher whose depths, widths or
strides may differ (the "correspondence establishment" of HGD, docs/methods/hgd.md).

A stage's *kind* is its name without the trailing level number (``res`` for backbone stages
``res2..res5`` from ``backbone.bottom_up``, ``p`` for pyramid levels ``p2..p7`` from
``backbone``); a student stage is only matched with a teacher stage of the same kind. The
*effective* teacher stride is its stride in student input pixels,
``teacher stride / teacher input scale``.
"""

import math
import re
from typing import List, Sequence

from torch import nn

from ...capture.features import available_features, feature_shapes

__all__ = ["MATCH_MODES", "stage_kind", "match_stages"]

MATCH_MODES = ("stride", "nearest_stride", "name")


def stage_kind(name: str) -> str:
    """``"res4" -> "res"``, ``"p2" -> "p"``, ``"stem" -> "stem"``."""
    return re.sub(r"\d+$", "", name)


def match_stages(
    student: nn.Module,
    teacher: nn.Module,
    student_stages: Sequence[str],
    mode: str = "stride",
    teacher_input_scale: float = 1.0,
) -> List[str]:
    """
    The teacher stage paired with each student stage:

    - ``"stride"``: the teacher stage of the same kind and the same effective stride
      (R18 -> R50: ``res2..res5`` and ``p2..p6`` pair by name; a teacher at twice the input
      resolution pairs student ``res2`` with teacher ``res3``);
    - ``"nearest_stride"``: the same kind and the closest effective stride (in log scale,
      ties to the stage of the same name, then to the finer map); the student map is then
      resized to the teacher's, e.g. when the teacher lacks a stage of that stride;
    - ``"name"``: the teacher stage of the same name.

    Raises ``ValueError`` naming the stage and the available teacher stages when a student
    stage has no partner.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"Unknown stage matching mode {mode!r}; choose one of {MATCH_MODES}.")
    student_stages = list(student_stages)
    s_shapes = feature_shapes(student, student_stages, "student")
    t_all = available_features(teacher)
    matched = []
    for name in student_stages:
        s_stride = s_shapes[name].stride
        candidates = {
            t: shape.stride / teacher_input_scale for t, shape in t_all.items() if stage_kind(t) == stage_kind(name)
        }
        listing = ", ".join(f"{t} (stride {stride:g})" for t, stride in sorted(candidates.items(), key=lambda x: x[1]))
        if mode == "name":
            if name not in t_all:
                raise ValueError(
                    f"Student stage '{name}' has no teacher stage of the same name (teacher stages of that kind: "
                    f"{listing or 'none'}). Match by stride or list the teacher stages explicitly."
                )
            matched.append(name)
            continue
        if not candidates:
            raise ValueError(
                f"Student stage '{name}' has no teacher stage of kind '{stage_kind(name)}' (teacher features: "
                f"{sorted(t_all)}). Remove it from the student stages or list its teacher stage explicitly."
            )
        if mode == "stride":
            same = [t for t, stride in candidates.items() if math.isclose(stride, s_stride)]
            if not same:
                raise ValueError(
                    f"Student stage '{name}' (stride {s_stride}) has no teacher stage of the same stride (teacher "
                    f"stages, strides in student pixels: {listing}). Use nearest-stride matching or list its "
                    "teacher stage explicitly."
                )
            matched.append(same[0])
        else:
            # Closest stride; among equally close ones the same name (a dilated res5 stays res5), then the finer.
            matched.append(
                min(candidates, key=lambda t: (abs(math.log2(candidates[t] / s_stride)), t != name, candidates[t]))
            )
    return matched
