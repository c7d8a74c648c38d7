"""A trained student (or any plain detector) for the tools that read checkpoints: loaded strictly."""

import os

from detectron2.modeling import build_model

from .teacher import format_mismatches, load_reporting_mismatches

__all__ = ["load_student", "StudentWeightsError"]


class StudentWeightsError(RuntimeError):
    """The student's weights are not given or do not fit the student of the config."""


def load_student(cfg, weights: str, allow_unexpected: bool = True, opt_out: str = ""):
    """
    The model of ``cfg`` with ``weights``, in eval mode. No weights, a missing or unreadable
    file, or missing or mis-shaped parameters are an error, so a tool never measures a random
    model silently.

    Args:
        allow_unexpected: allow keys the model does not have (a checkpoint may carry more than
            the detector). ``False`` makes them an error too, as for the teacher
            (``train_net.py --eval-only``).
        opt_out: how the caller lets a user skip this check, appended to the errors.
    """
    tail = f" ({opt_out})" if opt_out else ""
    if not weights:
        raise StudentWeightsError(
            "MODEL.WEIGHTS is empty: no student weights to load, so the model would be random. Set MODEL.WEIGHTS "
            f"to the model_final.pth of a run (OUTPUT_DIR/model_final.pth){tail}."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Student weights not found: {weights}. Pass the model_final.pth of a run (OUTPUT_DIR/model_final.pth){tail}."
        )
    model = build_model(cfg)
    problems = load_reporting_mismatches(model, weights, option="MODEL.WEIGHTS")
    if allow_unexpected:
        problems.pop("unexpected", None)
    if problems:
        raise StudentWeightsError(
            f"Student weights {weights} (MODEL.WEIGHTS) do not fit the student of the config: "
            f"{format_mismatches(problems)}. Pass the config the weights were trained with{tail}."
        )
    model.eval()
    return model
