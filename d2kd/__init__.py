"""
d2kd: knowledge distillation for Detectron2 object detectors.

Public API::

    from d2kd import add_distill_config, DistillTrainer, DISTILL_HEAD_REGISTRY, DistillHead
"""

from .config import add_distill_config, get_distill_cfg
from .data import register_bccd, register_coco_dataset, register_voc_dataset
from .engine import DistillTrainer
from .heads import DISTILL_HEAD_REGISTRY, DistillHead
from .modeling import backbone as _backbones  # noqa: F401  registers d2kd's backbones

__version__ = "0.1.0"

__all__ = [
    "add_distill_config",
    "get_distill_cfg",
    "DistillTrainer",
    "DISTILL_HEAD_REGISTRY",
    "DistillHead",
    "register_bccd",
    "register_voc_dataset",
    "register_coco_dataset",
]
