"""DistillationModel across detectors and pairs: RetinaNet, Mask R-CNN, other input formats and resolutions."""

import copy
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from torch import nn

from d2kd.config import merge_config
from d2kd import DistillTrainer, get_distill_cfg

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
    train,
)


class _Inputs:
    """Forward hooks keeping the positional inputs of modules, by name."""

    def __init__(self, **modules):
        self.data = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.data[name].append(inputs)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------
# RetinaNet and Mask R-CNN students, a Faster R-CNN teacher of a RetinaNet student
# ---------------------------------------------------------------------------------------


def test_retinanet_configs_mirror_the_rcnn_base():
    teacher = load_test_cfg("bccd/retinanet_R50_FPN_teacher.yaml", "/tmp/unused")
    student = load_test_cfg(RETINA_STUDENT, "/tmp/unused")
    rcnn = load_test_cfg("bccd/student_R18_FPN.yaml", "/tmp/unused")
    for cfg, depth in ((teacher, 50), (student, 18)):
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.RESNETS.DEPTH == depth
        assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.RETINANET.NORM) == ("GN", "GN", "GN")
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.FPN.OUT_CHANNELS == 128
        assert cfg.MODEL.RETINANET.NUM_CLASSES == 3 and list(cfg.MODEL.RETINANET.IN_FEATURES) == RETINA_LEVELS
        for key in ("PIXEL_MEAN", "PIXEL_STD"):
            assert list(cfg.MODEL[key]) == list(rcnn.MODEL[key])
    assert [s[0] for s in student.MODEL.ANCHOR_GENERATOR.SIZES] == [16, 32, 64, 128, 256]
    base = get_distill_cfg()
    merge_config(base, os.path.join(CONFIGS, RETINA_STUDENT))
    assert base.INPUT.MIN_SIZE_TRAIN == (320,)
    model = build_model(teacher)
    assert type(model).__name__ == "RetinaNet" and model.head_in_features == RETINA_LEVELS
    assert isinstance(model.head.cls_subnet[1], nn.GroupNorm) and model.anchor_generator.num_anchors == [9] * 5


@pytest.mark.train
def test_faster_rcnn_teacher_distils_retinanet_student(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_fitnet_FRCNN-R50_retinanet-R18.yaml", tmp_path, teacher_r18_weights)
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    trainer = train(cfg)
    assert type(trainer.teacher).__name__ == "GeneralizedRCNN"
    assert_logged_and_finite(trainer, ["loss_cls"] + [f"loss_kd_fitnet_{l}" for l in ("p3", "p4", "p5", "p6")])
    assert sorted(trainer.model.teacher_runner.parts) == ["backbone"]


@pytest.fixture(scope="module")
def tiny_mask_dataset():
    """4 BCCD images whose boxes get box-shaped polygon masks (BCCD has none)."""
    name = "bccd_tiny_box_masks"
    if name not in DatasetCatalog.list():
        records = copy.deepcopy(DatasetCatalog.get("bccd_trainval")[:4])
        for record in records:
            for ann in record["annotations"]:
                x0, y0, x1, y1 = ann["bbox"]  # XYXY_ABS in the BCCD loader
                ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(thing_classes=list(MetadataCatalog.get("bccd_trainval").thing_classes))
    return name


@pytest.mark.train
def test_mask_rcnn_student_keeps_its_mask_head_training(tmp_path, teacher_r18_weights, tiny_mask_dataset):
    opts = ["MODEL.MASK_ON", True, "DATASETS.TRAIN", (tiny_mask_dataset,), "DISTILL.HEADS", ["fitnet", "kd"]]
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=opts)
    trainer = train(cfg)
    assert trainer.student.roi_heads.mask_on and not hasattr(trainer.teacher.roi_heads, "mask_head")
    assert_logged_and_finite(trainer, ["loss_mask", "loss_cls", "loss_kd_kd", "loss_kd_fitnet_p2"])


# ---------------------------------------------------------------------------------------
# Inputs: each model's format and normalisation, a teacher at twice the resolution
# ---------------------------------------------------------------------------------------


def test_each_model_gets_its_own_format_and_normalisation(tmp_path, teacher_r18_weights):
    """An RGB, ImageNet-std student and a BGR, std-1 (model-zoo style) teacher."""
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=IMAGENET_RGB)
    bgr_std1 = ["MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675], "MODEL.PIXEL_STD", [1.0, 1.0, 1.0], "INPUT.FORMAT", "BGR"]
    cfg.DISTILL.TEACHER.OPTS = cfg.DISTILL.TEACHER.OPTS + bgr_std1
    model = build_distiller(cfg)
    student, teacher = model.student, model.teacher
    assert (student.input_format, teacher.input_format) == ("RGB", "BGR")
    batch = synthetic_batch(sizes=((100, 120),), empty=())
    image = batch[0]["image"].float()
    seen = _Inputs(student=student.backbone, teacher=teacher.backbone)
    try:
        step(model, batch)
    finally:
        seen.remove()
    (s_in,), (t_in,) = seen.data["student"][0], seen.data["teacher"][0]
    assert s_in.shape == t_in.shape == (1, 3, 128, 128)  # padded to 32
    rgb_mean, rgb_std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    bgr_mean = torch.tensor([103.53, 116.28, 123.675])
    expected_student = (image - rgb_mean[:, None, None]) / rgb_std[:, None, None]
    expected_teacher = image.flip(0) - bgr_mean[:, None, None]  # RGB -> BGR, std 1
    torch.testing.assert_close(s_in[0, :, :100, :120], expected_student)
    torch.testing.assert_close(t_in[0, :, :100, :120], expected_teacher)
    assert not t_in[0, :, 100:, :].any() and not t_in[0, :, :, 120:].any()  # zero padding


@pytest.mark.train
def test_low_resolution_student_teacher_at_twice_the_resolution(tmp_path, teacher_r18_weights):
    """INPUT_SCALE 2: teacher input, feature correspondence and RoI boxes end to end."""
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18_lowres.yaml", tmp_path, teacher_r18_weights)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96  # half of the tests' 128/192
    assert cfg.DISTILL.TEACHER.INPUT_SCALE == 2.0
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    student, teacher = trainer.student, trainer.teacher
    seen = _Inputs(
        student_backbone=student.backbone,
        teacher_backbone=teacher.backbone,
        student_pooler=student.roi_heads.box_pooler,
        teacher_pooler=teacher.roi_heads.box_pooler,
    )
    pairs = []
    pairing = trainer.heads["fitnet"].pairing
    original_pairs = pairing.pairs
    pairing.pairs = lambda s, t: pairs.append(original_pairs(s, t)) or pairs[-1]
    try:
        trainer.train()
    finally:
        seen.remove()
    assert_logged_and_finite(trainer, ["loss_kd_kd"] + [f"loss_kd_fitnet_p{i}" for i in range(2, 7)])
    for (s_in,), (t_in,) in zip(seen.data["student_backbone"], seen.data["teacher_backbone"]):
        assert s_in.shape[-2] == 64 and t_in.shape[-2] == 128  # short sides: student 64, teacher 128
        assert t_in.shape[-1] >= 2 * s_in.shape[-1] - 32
    # The teacher's box head gets the student's sampled RoIs, scaled to its resolution.
    assert len(seen.data["teacher_pooler"]) == 2
    for (_, s_boxes), (_, t_boxes) in zip(seen.data["student_pooler"], seen.data["teacher_pooler"]):
        for s, t in zip(s_boxes, t_boxes):
            assert len(s) > 0
            torch.testing.assert_close(t.tensor, 2 * s.tensor)
    # Every pair compares maps of equal size covering the same image extent.
    for name, adapted, target, raw in pairs[-1]:
        assert adapted.shape == target.shape
        cells = pairing.student_strides[name] / pairing.target_strides[name]
        assert cells == 2.0
        assert target.shape[-1] <= round(raw.shape[-1] * cells) and target.shape[-2] <= round(raw.shape[-2] * cells)
