"""
MobileNetV2 (Sandler et al., CVPR 2018) as a Detectron2 backbone, with FPN builders for
Faster R-CNN and RetinaNet: the light student a Detectron2 user swaps in.

The stages are named ``res2..res5`` (strides 4, 8, 16, 32) so the backbone is a drop-in
replacement for a ResNet in FPN configs and stage-pairing heads. The network is torchvision's
``mobilenet_v2``; ``MODEL.MOBILENET.WEIGHTS`` loads a torchvision-format ImageNet state dict
from a local path (e.g. ``mobilenet_v2-b0353104.pth``), which expects RGB input normalised
with ImageNet mean/std (see ``configs/bccd/student_MNV2_FPN.yaml``).
"""

import logging
import os

import torch
import torchvision
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn

from ...config.defaults import register_config_extension

__all__ = ["MobileNetV2Backbone", "add_mobilenet_config", "build_mobilenetv2_fpn_backbone", "build_mobilenetv2_retinanet_fpn_backbone"]

logger = logging.getLogger(__name__)

# Last index (inclusive) of torchvision's `features` in each stage, and the stage's stride.
_STAGE_ENDS = {"res2": (3, 4), "res3": (6, 8), "res4": (13, 16), "res5": (17, 32)}


def add_mobilenet_config(cfg):
    """``MODEL.MOBILENET``: WIDTH_MULT, NORM ("GN" | "BN" | "FrozenBN"), WEIGHTS, OUT_FEATURES."""
    if "MOBILENET" in cfg.MODEL:
        return
    cfg.MODEL.MOBILENET = CN()
    cfg.MODEL.MOBILENET.WIDTH_MULT = 1.0
    # GN trains from scratch with small batches; BN/FrozenBN match torchvision ImageNet weights.
    cfg.MODEL.MOBILENET.NORM = "GN"
    cfg.MODEL.MOBILENET.WEIGHTS = ""
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]


register_config_extension(add_mobilenet_config)  # every config d2kd builds has MODEL.MOBILENET


def _norm_layer(norm: str):
    if norm in ("BN", "FrozenBN"):
        return nn.BatchNorm2d
    if norm == "GN":
        # MobileNetV2 widths (16, 24, 32, 64, 96, 160, 320, ...) are all multiples of 8.
        return lambda channels: nn.GroupNorm(8, channels)
    raise ValueError(f"MODEL.MOBILENET.NORM must be 'GN', 'BN' or 'FrozenBN', got {norm!r}.")


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 ``features`` cut into stages ``res2..res5``."""

    def __init__(self, width_mult=1.0, norm="GN", out_features=("res2", "res3", "res4", "res5"), weights=""):
        super().__init__()
        unknown = set(out_features) - set(_STAGE_ENDS)
        if unknown:
            raise ValueError(f"MobileNetV2 has stages {list(_STAGE_ENDS)}; unknown OUT_FEATURES {sorted(unknown)}.")
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, norm_layer=_norm_layer(norm))
        self.features = net.features[: max(_STAGE_ENDS[f][0] for f in out_features) + 1]
        if weights:
            self._load_torchvision_weights(weights, norm)
        if norm == "FrozenBN":
            self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(self.features)
        self._out_features = list(out_features)
        probe = self._probe_channels()
        self._out_feature_strides = {f: _STAGE_ENDS[f][1] for f in out_features}
        self._out_feature_channels = {f: probe[f] for f in out_features}

    def _probe_channels(self):
        x = torch.zeros(1, 3, 64, 64)
        channels = {}
        with torch.no_grad():
            was_training = self.training
            self.eval()
            for i, layer in enumerate(self.features):
                x = layer(x)
                for name, (end, _) in _STAGE_ENDS.items():
                    if i == end:
                        channels[name] = x.shape[1]
            self.train(was_training)
        return channels

    def _load_torchvision_weights(self, path, norm):
        if norm == "GN":
            raise ValueError(
                "MODEL.MOBILENET.WEIGHTS holds BatchNorm statistics; set MODEL.MOBILENET.NORM to 'BN' or "
                "'FrozenBN' to load ImageNet weights (GN is for training from scratch)."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"MobileNetV2 ImageNet weights not found: {path} (MODEL.MOBILENET.WEIGHTS).")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        wanted = {k: v for k, v in state.items() if k.startswith("features.")}
        own = self.state_dict()
        wanted = {k: v for k, v in wanted.items() if k in own}
        missing = sorted(set(own) - set(wanted))
        if missing:
            raise ValueError(f"{path} is not a torchvision MobileNetV2 state dict: missing {missing[:5]} ...")
        self.load_state_dict(wanted)
        logger.info(f"Loaded torchvision MobileNetV2 ImageNet weights from {path}")

    def forward(self, x):
        outputs = {}
        ends = {end: name for name, (end, _) in _STAGE_ENDS.items() if name in self._out_features}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in ends:
                outputs[ends[i]] = x
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _bottom_up(cfg):
    m = cfg.MODEL.MOBILENET
    return MobileNetV2Backbone(m.WIDTH_MULT, m.NORM, m.OUT_FEATURES, m.WEIGHTS)


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + FPN (p2..p6) for Faster/Mask R-CNN, like ``build_resnet_fpn_backbone``."""
    return FPN(
        bottom_up=_bottom_up(cfg),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + FPN (p3..p7) for RetinaNet, like ``build_retinanet_resnet_fpn_backbone``."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    bottom_up = _bottom_up(cfg)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
