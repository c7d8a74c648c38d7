"""d2kd.config.loader: the one config loader (paths, model-zoo names, relative paths, key errors)."""

import glob
import os

import pytest
import yaml

from d2kd.config import ConfigOptionError, load_config, resolve_config_file
from d2kd.modeling.teacher import build_teacher_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The presets (configs/) and the study's variants of them (benchmarks/configs/).
SHIPPED = sorted(
    glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    + glob.glob(os.path.join(REPO, "benchmarks", "configs", "**", "*.yaml"), recursive=True)
)


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_relative_teacher_config_resolves_against_the_yaml_that_names_it(tmp_path, monkeypatch):
    teacher = _write(tmp_path / "project" / "teacher.yaml", {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 7}}})
    _write(tmp_path / "project" / "weights" / "t.pth", {})
    student = _write(
        tmp_path / "project" / "student.yaml",
        {"DISTILL": {"HEADS": ["fitnet"], "TEACHER": {"CONFIG_FILE": "teacher.yaml", "WEIGHTS": "weights/t.pth"}}},
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(student)
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == teacher
    assert cfg.DISTILL.TEACHER.WEIGHTS == str(tmp_path / "project" / "weights" / "t.pth")
    assert build_teacher_cfg(cfg).MODEL.ROI_HEADS.NUM_CLASSES == 7


def test_a_path_set_in_a_base_resolves_against_the_base(tmp_path, monkeypatch):
    teacher = _write(tmp_path / "bases" / "teacher.yaml", {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 5}}})
    _write(tmp_path / "bases" / "Base-distill.yaml", {"DISTILL": {"TEACHER": {"CONFIG_FILE": "teacher.yaml"}}})
    child = _write(tmp_path / "presets" / "distill.yaml", {"_BASE_": "../bases/Base-distill.yaml", "DISTILL": {"HEADS": ["kd"]}})
    monkeypatch.chdir(tmp_path)
    assert load_config(child).DISTILL.TEACHER.CONFIG_FILE == teacher


def test_a_path_missing_beside_the_yaml_is_left_to_the_working_directory(tmp_path, monkeypatch):
    """Outputs (weights not trained yet) and model-zoo names keep their value."""
    student = _write(
        tmp_path / "cfgs" / "student.yaml",
        {
            "MODEL": {"WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl"},
            "DISTILL": {
                "TEACHER": {
                    "CONFIG_FILE": "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml",
                    "WEIGHTS": "output/teacher/model_final.pth",
                }
            },
        },
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(student)
    assert cfg.DISTILL.TEACHER.WEIGHTS == "output/teacher/model_final.pth"
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"


def test_command_line_options_are_not_rewritten(tmp_path, monkeypatch):
    _write(tmp_path / "cfgs" / "teacher.yaml", {})
    student = _write(tmp_path / "cfgs" / "student.yaml", {})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(student, ["DISTILL.TEACHER.CONFIG_FILE", "teacher.yaml"])
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "teacher.yaml"


def test_unknown_key_names_the_closest_one(tmp_path):
    student = _write(tmp_path / "s.yaml", {"SOLVER": {"BASE_LRR": 0.1}})
    with pytest.raises(ConfigOptionError, match=r"SOLVER\.BASE_LR"):
        load_config(student)
    with pytest.raises(ConfigOptionError, match=r"Did you mean DISTILL\.WARMUP_ITERS"):
        load_config(_write(tmp_path / "t.yaml", {}), ["DISTILL.WARMUP_ITER", "3"])


def test_teacher_option_typo_names_distill_teacher_opts(tmp_path):
    teacher = _write(tmp_path / "teacher.yaml", {})
    student = _write(
        tmp_path / "student.yaml",
        {"DISTILL": {"TEACHER": {"CONFIG_FILE": "teacher.yaml", "OPTS": ["MODEL.ROI_HEADS.NUM_CLASSS", "3"]}}},
    )
    cfg = load_config(student)
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == teacher
    with pytest.raises(ConfigOptionError, match=r"DISTILL\.TEACHER\.OPTS.*NUM_CLASSES|NUM_CLASSES.*DISTILL\.TEACHER\.OPTS"):
        build_teacher_cfg(cfg)


def test_model_zoo_names_resolve():
    assert os.path.isfile(resolve_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    with pytest.raises(FileNotFoundError, match="model-zoo"):
        resolve_config_file("no/such.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO) for p in SHIPPED])
def test_shipped_configs_load_from_any_working_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    if cfg.DISTILL.TEACHER.CONFIG_FILE:
        teacher_cfg = build_teacher_cfg(cfg)
        assert teacher_cfg.MODEL.META_ARCHITECTURE


def test_an_odd_length_option_list_names_the_key_and_the_list():
    from d2kd.config import ConfigOptionError, load_config

    with pytest.raises(ConfigOptionError, match=r"DISTILL\.TEACHER\.OPTS must be a list of KEY VALUE pairs, but it has 3 entries: \['INPUT\.MIN_SIZE_TEST', 96, 'SEED'\]"):
        load_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", ["INPUT.MIN_SIZE_TEST", 96, "SEED"], opts_name="DISTILL.TEACHER.OPTS")
    with pytest.raises(ConfigOptionError, match=r"the command-line options must be a list of KEY VALUE pairs.*\['SOLVER\.MAX_ITER'\]"):
        load_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", ["SOLVER.MAX_ITER"])


def test_an_odd_length_teacher_opts_is_named_when_the_teacher_config_is_built(tmp_path):
    from d2kd import get_distill_cfg
    from d2kd.config import ConfigOptionError
    from d2kd.modeling.teacher import build_teacher_cfg

    cfg = get_distill_cfg()
    cfg.DISTILL.HEADS = ["fitnet"]
    cfg.DISTILL.TEACHER.CONFIG_FILE = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
    cfg.DISTILL.TEACHER.OPTS = ["INPUT.MIN_SIZE_TEST", 96, "MODEL.RPN.PRE_NMS_TOPK_TEST"]
    with pytest.raises(ConfigOptionError, match=r"DISTILL\.TEACHER\.OPTS must be a list of KEY VALUE pairs, but it has 3 entries"):
        build_teacher_cfg(cfg)
    cfg.DISTILL.TEACHER.CONFIG_FILE = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"  # a LazyConfig teacher: the same check
    with pytest.raises(ConfigOptionError, match=r"DISTILL\.TEACHER\.OPTS must be a list of KEY VALUE pairs"):
        build_teacher_cfg(cfg)
