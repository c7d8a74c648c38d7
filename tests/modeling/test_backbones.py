"""Swapped student backbones: MobileNetV2-FPN (torchvision weights, RetinaNet) and the custom-backbone guide."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from d2kd import DistillTrainer
from d2kd.modeling.teacher import build_teacher_cfg

from conftest import (
    CONFIGS,
    IMAGENET_RGB,
    RETINA_LEVELS,
    RETINA_STUDENT,
    assert_logged_and_finite,
    build_distiller,
    distill_cfg,
    load_test_cfg,
    step,
    synthetic_batch,
)


# ---------------------------------------------------------------------------------------
# MobileNetV2-FPN
# ---------------------------------------------------------------------------------------


@pytest.mark.train
def test_mobilenet_v2_student_from_torchvision_weights(tmp_path, teacher_r18_weights):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2(weights=None)
    for m in reference.modules():  # non-trivial statistics, so loading is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    weights = str(tmp_path / "mobilenet_v2.pth")
    torch.save(reference.state_dict(), weights)

    opts = ["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", weights] + IMAGENET_RGB
    cfg = distill_cfg("bccd/distill_fitnet_R50_MNV2.yaml", tmp_path / "run", teacher_r18_weights, opts=opts)
    assert list(cfg.DISTILL.HEADS) == ["fitnet", "kd"]
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    bottom_up = trainer.student.backbone.bottom_up
    shapes = bottom_up.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert {k: v.channels for k, v in shapes.items()} == {"res2": 24, "res3": 32, "res4": 96, "res5": 320}
    own = bottom_up.state_dict()
    for key in ("features.0.0.weight", "features.5.conv.1.0.weight", "features.17.conv.3.running_mean", "features.17.conv.3.running_var"):
        torch.testing.assert_close(own[key], reference.state_dict()[key], msg=key)
    trainer.train()
    assert_logged_and_finite(trainer, ["loss_kd_kd"] + [f"loss_kd_fitnet_p{i}" for i in range(2, 7)])
    # FrozenBN statistics stay the ImageNet ones.
    key = "features.17.conv.3.running_mean"
    torch.testing.assert_close(bottom_up.state_dict()[key], reference.state_dict()[key])


def test_mobilenet_v2_retinanet_student(tmp_path, retina_r18_weights):
    """The RetinaNet builder of the swapped backbone (p3..p7) under the RetinaNet teacher."""
    opts = ["MODEL.BACKBONE.NAME", "build_mobilenetv2_retinanet_fpn_backbone", "DISTILL.HEADS", ["fitnet", "densekd"]]
    cfg = distill_cfg("bccd/distill_fitnet_retinanet_R50_R18.yaml", tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT, opts=opts)
    model = build_distiller(cfg)
    assert sorted(model.student.backbone.output_shape()) == RETINA_LEVELS
    losses = step(model, synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert {f"loss_kd_{h}_{l}" for h in ("fitnet", "densekd") for l in RETINA_LEVELS} <= set(losses)


def test_mobilenet_v2_bad_weights_are_clear_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.pth"))
    for opts, match in (
        (["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", str(tmp_path / "other.pth")], "not a torchvision MobileNetV2"),
        (["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", str(tmp_path / "nope.pth")], "not found"),
        (["MODEL.MOBILENET.WEIGHTS", str(tmp_path / "other.pth")], "NORM"),  # GN cannot hold BN statistics
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            build_model(load_test_cfg("bccd/student_MNV2_FPN.yaml", tmp_path, opts))


# ---------------------------------------------------------------------------------------
# The custom-backbone guide's example (docs/custom_backbone.md), executed
# ---------------------------------------------------------------------------------------


def test_custom_backbone_guide_example(tmp_path, teacher_r18_weights):
    import re
    import types

    from detectron2.modeling import BACKBONE_REGISTRY

    guide = open(os.path.join(os.path.dirname(CONFIGS), "docs", "custom_backbone.md")).read()
    code = re.findall(r"```python\n(.*?)```", guide, re.S)[0]
    if "build_tinynet_fpn_backbone" not in BACKBONE_REGISTRY:
        exec(compile(code, "docs/custom_backbone.md", "exec"), types.ModuleType("my_backbone").__dict__)
    # The guide's YAML, as options on the same base config.
    yaml_opts = ["MODEL.BACKBONE.NAME", "build_tinynet_fpn_backbone", "MODEL.TINYNET.WIDTH", 32, "DISTILL.HEADS", ["fitnet", "kd"]]
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=yaml_opts)
    assert "TINYNET" in build_teacher_cfg(cfg).MODEL  # the teacher's config carries the keys too
    model = build_distiller(cfg)
    assert type(model.student.backbone.bottom_up).__name__ == "TinyNet"
    adapters = model.heads["fitnet"].pairing.adapters
    assert sorted(adapters) == ["p2", "p3", "p4", "p5", "p6"]
    losses = step(model, synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_kd_kd" in losses and "loss_kd_fitnet_p2" in losses
