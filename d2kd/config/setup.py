"""Building a Detectron2 config with the DISTILL node, from a path or a model-zoo name."""

import os

from detectron2.config import CfgNode, get_cfg

from .defaults import add_distill_config

__all__ = ["get_distill_cfg", "resolve_config_file", "load_config_file"]


def get_distill_cfg() -> CfgNode:
    """Detectron2's default config plus the DISTILL node."""
    return add_distill_config(get_cfg())


def resolve_config_file(name: str, role: str = "config") -> str:
    """
    Return a readable path for ``name``: an existing file, or a Detectron2 model-zoo config
    name (e.g. ``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``).
    """
    if not name:
        raise FileNotFoundError(f"No {role} file given.")
    if os.path.isfile(name):
        return name
    try:
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(name)
    except Exception:  # model_zoo raises RuntimeError for unknown names
        path = None
    if path and os.path.isfile(path):
        return path
    raise FileNotFoundError(
        f"The {role} '{name}' is neither an existing file nor a Detectron2 model-zoo config "
        "name (e.g. 'COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml'). Check the path; relative "
        f"paths are resolved from the working directory {os.getcwd()}."
    )


def load_config_file(name: str, opts=(), role: str = "config") -> CfgNode:
    """A config (with the DISTILL node) merged from a path or model-zoo name, then ``opts``."""
    cfg = get_distill_cfg()
    cfg.merge_from_file(resolve_config_file(name, role))
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
