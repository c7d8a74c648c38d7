"""The teacher: configs and weights that cannot be loaded fail before training; model-zoo teachers by name."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from d2kd import DistillTrainer
from d2kd.modeling.teacher import TeacherWeightsError, build_teacher, build_teacher_cfg

from conftest import FITNET, RETINA_LEVELS, assert_logged_and_finite, distill_cfg, load_test_cfg, train


# ---------------------------------------------------------------------------------------
# Teacher configs and weights
# ---------------------------------------------------------------------------------------


def test_missing_teacher_weights_fails_before_training(tmp_path):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, str(tmp_path / "nope.pth"))
    with pytest.raises(TeacherWeightsError, match="not found"):
        DistillTrainer(cfg)
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, "")
    with pytest.raises(TeacherWeightsError, match="random"):
        DistillTrainer(cfg)


def test_teacher_weights_of_another_architecture_fail(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(
        "bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, teacher_config="bccd/teacher_R50_FPN.yaml"
    )
    with pytest.raises(TeacherWeightsError, match="missing|unexpected|shape"):
        DistillTrainer(cfg)


def test_teacher_config_not_found(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights)
    cfg.DISTILL.TEACHER.CONFIG_FILE = "configs/bccd/no_such_teacher.yaml"
    with pytest.raises(FileNotFoundError, match="teacher config.*no_such_teacher.yaml.*neither an existing file"):
        DistillTrainer(cfg)


def test_teacher_weights_with_missing_and_unexpected_keys(tmp_path, teacher_r18_weights, d2kd_logs):
    checkpoint = torch.load(teacher_r18_weights, weights_only=True)
    model = checkpoint["model"]
    removed = model.pop("roi_heads.box_predictor.cls_score.bias")
    model["roi_heads.extra_layer.weight"] = torch.zeros(3)
    partial = str(tmp_path / "partial.pth")
    torch.save(checkpoint, partial)

    cfg = distill_cfg(FITNET, tmp_path, partial)
    with pytest.raises(TeacherWeightsError) as e:
        build_teacher(cfg)
    text = str(e.value)
    assert "missing (1): ['roi_heads.box_predictor.cls_score.bias']" in text
    assert "unexpected (1): ['roi_heads.extra_layer.weight']" in text
    assert "STRICT_LOAD False" in text

    # Partial loading when asked: loaded keys come from the file, a report is logged.
    cfg.DISTILL.TEACHER.STRICT_LOAD = False
    logs = d2kd_logs("d2kd.modeling.teacher")
    logs.clear()
    teacher = build_teacher(cfg).model
    records = logs.records
    state = teacher.state_dict()
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], model["roi_heads.box_predictor.cls_score.weight"])
    assert state["roi_heads.box_predictor.cls_score.bias"].shape == removed.shape
    assert any("partial loading allowed" in r.getMessage() and "cls_score.bias" in r.getMessage() for r in records)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# ---------------------------------------------------------------------------------------
# Model-zoo teachers by name (real R101 configs, random weights saved to a checkpoint)
# ---------------------------------------------------------------------------------------


ZOO_SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192, "DATASETS.TRAIN", ("bccd_trainval",)]
ZOO_CASES = {
    # zoo config: (student distillation config, teacher OPTS, heads and their options, expected terms)
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml": (
        "bccd/distill_fitnet_zoo-R101_MNV2.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["fitnet", "kd"]],
        ["loss_kd_kd", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"],
    ),
    "COCO-Detection/retinanet_R_101_FPN_3x.yaml": (
        "bccd/distill_densekd_retinanet_R50_R18.yaml",
        ["MODEL.RETINANET.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["densekd", "fitnet"], "DISTILL.FITNET.IN_FEATURES", RETINA_LEVELS],
        ["loss_kd_densekd_p3", "loss_kd_densekd_p7", "loss_kd_fitnet_p3", "loss_kd_fitnet_p7"],
    ),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml": (
        "bccd/distill_kd_R50_R18.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["fitnet", "kd"]],
        ["loss_kd_kd", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"],
    ),
}


@pytest.mark.train
@pytest.mark.parametrize("zoo_name", list(ZOO_CASES))
def test_model_zoo_teacher_by_name(tmp_path, zoo_name):
    config, teacher_opts, head_opts, expected = ZOO_CASES[zoo_name]
    opts = ["DISTILL.TEACHER.CONFIG_FILE", zoo_name, "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "zoo" / "model.pth")]
    cfg = load_test_cfg(config, tmp_path, opts + head_opts, max_iter=1)
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        # densekd compares anchor by anchor: give the teacher the student's (BCCD) anchor sizes,
        # 9 per cell as its weights expect.
        teacher_opts = teacher_opts + ["MODEL.ANCHOR_GENERATOR.SIZES", [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]]
    cfg.DISTILL.TEACHER.OPTS = ZOO_SMALL_INPUT + teacher_opts
    if cfg.MODEL.MOBILENET.WEIGHTS:  # the ImageNet-initialised MobileNetV2 student
        import torchvision

        cfg.MODEL.MOBILENET.WEIGHTS = str(tmp_path / "mobilenet_v2.pth")
        torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), cfg.MODEL.MOBILENET.WEIGHTS)
    # Save random weights of the zoo architecture (a stand-in for the downloaded model_final).
    teacher_cfg = build_teacher_cfg(cfg)
    assert teacher_cfg.MODEL.RESNETS.DEPTH == 101 and teacher_cfg.MODEL.FPN.OUT_CHANNELS == 256
    teacher = build_model(teacher_cfg)
    (tmp_path / "zoo").mkdir()
    DetectionCheckpointer(teacher, save_dir=str(tmp_path / "zoo")).save("model")
    del teacher

    trainer = train(cfg)
    assert trainer.teacher.backbone.bottom_up.stages[2].__len__() == 23  # R101: 23 blocks in res4
    assert trainer.teacher.input_format == "BGR" and torch.all(trainer.teacher.pixel_std == 1)
    assert_logged_and_finite(trainer, expected)
