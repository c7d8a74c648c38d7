"""A trained student (or any plain detector) for the tools that read checkpoints: loaded strictly."""

import os

from detectron2.modeling import build_model

from .teacher import format_mismatches, load_reporting_mismatches

__all__ = ["load_student"]


def load_student(cfg, weights: str):
    """The model of ``cfg`` with ``weights``, in eval mode; a missing file or missing or
    mis-shaped parameters are an error, so a tool never measures a random model silently.
    Unexpected keys are allowed (a checkpoint may carry more than the detector)."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Student weights not found: {weights}. Pass the model_final.pth of a run (OUTPUT_DIR/model_final.pth)."
        )
    model = build_model(cfg)
    problems = load_reporting_mismatches(model, weights)
    problems.pop("unexpected", None)
    if problems:
        raise RuntimeError(
            f"Student weights {weights} do not fit the student of the config: {format_mismatches(problems)}. "
            "Pass the config the weights were trained with."
        )
    model.eval()
    return model
