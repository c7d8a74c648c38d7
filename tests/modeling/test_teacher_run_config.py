"""A teacher trained with overrides is described by its run's config.yaml, found beside its weights."""

import os

import pytest

from d2kd.config import get_distill_cfg, load_config
from d2kd.modeling.teacher import TeacherWeightsError, build_teacher_cfg, teacher_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEACHER_YAML = os.path.join(REPO, "configs", "bccd", "teacher_R50_FPN.yaml")


@pytest.fixture
def teacher_run(tmp_path):
    """A teacher run folder: config.yaml as Detectron2's default_setup writes it (with overrides), weights."""
    run = tmp_path / "teacher_run"
    run.mkdir()
    cfg = load_config(TEACHER_YAML, ["DATASETS.TRAIN", ("bccd_train",), "MODEL.ROI_HEADS.NUM_CLASSES", 3])
    (run / "config.yaml").write_text(cfg.dump())
    (run / "model_final.pth").write_bytes(b"not read here")
    return run


def _student(weights, config_file="", opts=()):
    cfg = get_distill_cfg()
    cfg.DISTILL.TEACHER.WEIGHTS = str(weights)
    cfg.DISTILL.TEACHER.CONFIG_FILE = config_file
    cfg.DISTILL.TEACHER.OPTS = list(opts)
    return cfg


def test_run_config_is_used_when_no_teacher_config_is_given(teacher_run):
    weights = teacher_run / "model_final.pth"
    assert teacher_run_config(str(weights)) == str(teacher_run / "config.yaml")
    teacher = build_teacher_cfg(_student(weights))
    assert tuple(teacher.DATASETS.TRAIN) == ("bccd_train",) and teacher.MODEL.WEIGHTS == str(weights)


def test_a_stale_teacher_config_is_an_error_naming_the_run_config(teacher_run):
    weights = teacher_run / "model_final.pth"
    stale = _student(weights, TEACHER_YAML, ["MODEL.ROI_HEADS.NUM_CLASSES", 5])
    with pytest.raises(TeacherWeightsError, match=r"NUM_CLASSES: 5 in .*3 in .*config\.yaml.*Set DISTILL\.TEACHER\.CONFIG_FILE to"):
        build_teacher_cfg(stale)


def test_the_run_s_datasets_replace_the_yaml_s(teacher_run):
    teacher = build_teacher_cfg(_student(teacher_run / "model_final.pth", TEACHER_YAML))
    assert tuple(load_config(TEACHER_YAML).DATASETS.TRAIN) != ("bccd_train",)
    assert tuple(teacher.DATASETS.TRAIN) == ("bccd_train",)


def test_no_config_anywhere_is_an_error(tmp_path):
    with pytest.raises(TeacherWeightsError, match="CONFIG_FILE is empty"):
        build_teacher_cfg(_student(tmp_path / "weights.pth"))
