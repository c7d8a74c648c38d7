"""A LazyConfig teacher (the zoo's new_baselines LSJ Mask R-CNN): instantiated, strictly loaded, frozen, distilled from."""

import math

import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate

from conftest import distill_cfg, latest_losses, train
from d2kd.data import BCCD_CLASSES
from d2kd.modeling.teacher import TeacherWeightsError, build_teacher, load_lazy_teacher_config

LSJ = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
THREE_CLASSES = ["model.roi_heads.num_classes", 3]


@pytest.fixture(scope="module")
def lsj_weights(tmp_path_factory):
    """Random weights of the LSJ R50 teacher with BCCD's 3 classes."""
    folder = tmp_path_factory.mktemp("lsj")
    model = instantiate(load_lazy_teacher_config(LSJ, THREE_CLASSES).model)
    DetectionCheckpointer(model, save_dir=str(folder)).save("teacher")
    return str(folder / "teacher.pth")


def _cfg(tmp_path, weights, opts=THREE_CLASSES):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, weights, max_iter=2,
                      opts=["DISTILL.HEADS", ["fitnet", "kd"], "DISTILL.TEACHER.CLASSES", list(BCCD_CLASSES)])
    cfg.DISTILL.TEACHER.CONFIG_FILE = LSJ
    cfg.DISTILL.TEACHER.OPTS = list(opts)  # LazyConfig keys, not the YAML teacher's input sizes
    return cfg


@pytest.mark.train
def test_lsj_teacher_distils_with_a_feature_and_a_roi_head(tmp_path, lsj_weights):
    trainer = train(_cfg(tmp_path, lsj_weights))
    teacher = trainer.teacher
    assert type(teacher).__name__ == "GeneralizedRCNN" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher.roi_heads.box_predictor.num_classes == 3
    assert trainer.teacher_cfg.INPUT.FORMAT == "BGR"
    losses = latest_losses(trainer)
    kd_terms = {k: v for k, v in losses.items() if k.startswith(("loss_kd_fitnet", "loss_kd_kd"))}
    assert any(k.startswith("loss_kd_fitnet") for k in kd_terms) and "loss_kd_kd" in kd_terms
    assert all(math.isfinite(v) for v in kd_terms.values()), kd_terms


def test_lsj_teacher_is_loaded_strictly(tmp_path, lsj_weights):
    wrong = _cfg(tmp_path, lsj_weights, opts=["model.roi_heads.num_classes", 5])
    with pytest.raises(TeacherWeightsError):
        build_teacher(wrong)
