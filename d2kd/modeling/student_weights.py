"""A trained student (or any plain detector) for the tools that read checkpoints: loaded strictly."""

import os

from detectron2.modeling import build_model

from .teacher import _ReportingCheckpointer

__all__ = ["load_student"]


def load_student(cfg, weights: str):
    """The model of ``cfg`` with ``weights``, in eval mode; a missing file or missing or
    mis-shaped parameters are an error, so a tool never measures a random model silently."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Student weights not found: {weights}. Pass the model_final.pth of a run (OUTPUT_DIR/model_final.pth)."
        )
    model = build_model(cfg)
    checkpointer = _ReportingCheckpointer(model)
    checkpointer.load(weights)
    bad = checkpointer.incompatible
    problems = list(bad.missing_keys) + [k for k, _, _ in getattr(bad, "incorrect_shapes", [])]
    if problems:
        raise RuntimeError(
            f"Student weights {weights} do not fit the student of the config: {problems[:8]}"
            f"{' ...' if len(problems) > 8 else ''}. Pass the config the weights were trained with."
        )
    model.eval()
    return model
