"""Backbones d2kd registers in Detectron2's BACKBONE_REGISTRY (importing d2kd registers them)."""

from .mobilenet_v2 import (
    MobileNetV2Backbone,
    add_mobilenet_config,
    build_mobilenetv2_fpn_backbone,
    build_mobilenetv2_retinanet_fpn_backbone,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
