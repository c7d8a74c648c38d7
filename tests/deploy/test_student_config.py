"""
d2kd.deploy.student_config: a run's student as a config plain Detectron2's get_cfg() accepts,
building the same architecture (R-CNN, RetinaNet, and the MobileNetV2 student through
student_config_d2kd.yaml after ``import d2kd``).
"""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import d2kd  # noqa: F401  registers MobileNetV2
from d2kd.config import load_config
from d2kd.deploy import D2KD_CONFIG_NAME, read_class_names, student_config, student_d2kd_config, write_student_config

from conftest import RETINA_STUDENT, load_test_cfg


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plain_cfg(path):
    """Plain Detectron2: get_cfg() and merge_from_file, no set_new_allowed."""
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("config", ["bccd/student_R18_FPN.yaml", RETINA_STUDENT])
def test_plain_get_cfg_builds_the_same_student(tmp_path, config):
    cfg = load_test_cfg(config, tmp_path)
    path = write_student_config(cfg, str(tmp_path))
    assert not os.path.exists(tmp_path / D2KD_CONFIG_NAME), "Detectron2's own backbone needs no second file"
    text = open(path).read()
    assert "DISTILL" not in text and "DEFINE" not in text and "MOBILENET" not in text
    plain = plain_cfg(path)
    assert plain.MODEL.WEIGHTS == os.path.join(str(tmp_path), "model_final.pth")
    assert plain.INPUT.FORMAT == cfg.INPUT.FORMAT and plain.MODEL.PIXEL_STD == list(cfg.MODEL.PIXEL_STD)
    assert (plain.INPUT.MIN_SIZE_TEST, plain.INPUT.MAX_SIZE_TEST) == (128, 192)
    assert read_class_names(path) == ["RBC", "WBC", "Platelets"]
    torch.manual_seed(0)
    assert shapes(build_model(plain)) == shapes(build_model(cfg))
    # and d2kd's loader reads it too
    assert shapes(build_model(load_config(path))) == shapes(build_model(cfg))


def test_num_classes_and_test_sizes_are_kept(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    plain = plain_cfg(write_student_config(cfg, str(tmp_path)))
    assert plain.MODEL.ROI_HEADS.NUM_CLASSES == 3
    retina = load_test_cfg(RETINA_STUDENT, tmp_path)
    assert plain_cfg(write_student_config(retina, str(tmp_path / "r"))).MODEL.RETINANET.NUM_CLASSES == 3


def test_only_keys_differing_from_detectron2_defaults_are_written(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    text = student_config(cfg)
    assert "SOLVER" not in text and "OUTPUT_DIR" not in text and "DATALOADER" not in text
    assert "PIXEL_MEAN" not in text  # Detectron2's default BGR mean
    assert "\n  WEIGHTS:" not in text  # student_config's default: pointing at nothing
    assert plain_cfg_from_text(tmp_path, text).MODEL.WEIGHTS == ""


def plain_cfg_from_text(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return plain_cfg(str(path))


def test_datasets_are_kept_only_when_detectron2_registers_them(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("coco_2017_train",), ("bccd_test",)
    text = student_config(cfg)
    plain = plain_cfg_from_text(tmp_path, text)
    assert list(plain.DATASETS.TRAIN) == ["coco_2017_train"] and len(plain.DATASETS.TEST) == 0
    assert "dropped (not datasets Detectron2 registers itself): bccd_test" in text
    cfg.DATASETS.TEST = ("coco_2017_val", "voc_2007_test")
    assert list(plain_cfg_from_text(tmp_path, student_config(cfg)).DATASETS.TEST) == ["coco_2017_val", "voc_2007_test"]


def test_class_names_fall_back_to_datasets_classes(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    cfg.DATASETS.TRAIN, cfg.DATASETS.CLASSES = ("not_registered",), ["cat", "dog", "bird"]
    path = write_student_config(cfg, str(tmp_path))
    assert read_class_names(path) == ["cat", "dog", "bird"]


def test_mobilenet_student_plain_file_and_d2kd_file(tmp_path):
    """The MNV2 student: plain keys in student_config.yaml, MODEL.MOBILENET in the _d2kd file."""
    cfg = load_test_cfg("bccd/student_MNV2_FPN.yaml", tmp_path, opts=["MODEL.MOBILENET.WIDTH_MULT", 0.5])
    path = write_student_config(cfg, str(tmp_path))
    text = open(path).read()
    assert "import d2kd" in text and "MOBILENET:" in text  # the comment block
    plain = plain_cfg(path)  # plain Detectron2 accepts the file ...
    assert plain.MODEL.BACKBONE.NAME == "build_mobilenetv2_fpn_backbone" and "MOBILENET" not in plain.MODEL
    # ... and after `import d2kd`, d2kd's loader of the second file gives the same student.
    extension = tmp_path / D2KD_CONFIG_NAME
    assert extension.read_text() == student_d2kd_config(cfg)
    loaded = load_config(str(extension))
    assert loaded.MODEL.MOBILENET.WIDTH_MULT == 0.5 and loaded.MODEL.MOBILENET.WEIGHTS == ""
    assert loaded.MODEL.WEIGHTS == plain.MODEL.WEIGHTS
    assert shapes(build_model(loaded)) == shapes(build_model(cfg))
    # the default width would be another model: the second file is needed
    assert shapes(build_model(load_config(path))) != shapes(build_model(cfg))


def test_initialisation_weights_are_cleared(tmp_path):
    cfg = load_test_cfg("bccd/student_MNV2_FPN.yaml", tmp_path)
    cfg.MODEL.MOBILENET.WEIGHTS = "/nowhere/mobilenet_v2-b0353104.pth"
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    assert "/nowhere" not in student_d2kd_config(cfg)
