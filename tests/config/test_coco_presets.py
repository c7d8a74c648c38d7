"""The real-scale presets: students identical to Detectron2's zoo models, every preset's heads built on the zoo pair."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model

from d2kd.config import load_config
from d2kd.heads import build_distill_heads
from d2kd.modeling.teacher import build_teacher_cfg
from d2kd.step import BuildContext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO = os.path.join(REPO, "configs", "coco")
NO_DOWNLOAD = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
STUDENTS = {
    "faster_rcnn_R_50_FPN_1x.yaml": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "retinanet_R_50_FPN_1x.yaml": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "mask_rcnn_R_50_FPN_1x.yaml": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}
PAIRS = {"": "Base-distill-R101-R50.yaml", "retinanet_": "Base-distill-retinanet-R101-R50.yaml",
         "mask_rcnn_": "Base-distill-mask-R101-R50.yaml"}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ours,zoo", sorted(STUDENTS.items()))
def test_student_is_the_zoo_model(ours, zoo):
    mine, theirs = load_config(os.path.join(COCO, ours), NO_DOWNLOAD), load_config(zoo, NO_DOWNLOAD)
    for key in ("INPUT.MIN_SIZE_TRAIN", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "MODEL.ANCHOR_GENERATOR.SIZES"):
        a, b = mine, theirs
        for part in key.split("."):
            a, b = a[part], b[part]
        if key.endswith("SIZES"):
            a, b = [x for row in a for x in row], [x for row in b for x in row]
            assert a == pytest.approx(b), key
        else:
            assert a == b, key
    assert _shapes(build_model(mine)) == _shapes(build_model(theirs))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_every_preset_builds_its_heads_on_the_zoo_pair(kind):
    base = load_config(os.path.join(COCO, PAIRS[kind]), NO_DOWNLOAD)
    torch.manual_seed(0)
    student = build_model(base)
    teacher = build_model(build_teacher_cfg(base))
    suffix = f"_{kind}R101_R50.yaml" if kind else "_R101_R50.yaml"
    presets = [p for p in sorted(glob.glob(os.path.join(COCO, f"distill_*{suffix}")))
               if kind or not any(k and k in os.path.basename(p) for k in PAIRS)]
    assert len(presets) >= 8
    for path in presets:
        cfg = load_config(path, NO_DOWNLOAD)
        assert cfg.DISTILL.TEACHER.CONFIG_FILE == base.DISTILL.TEACHER.CONFIG_FILE, path
        heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, build_teacher_cfg(cfg)))
        assert list(heads) == [h.lower() for h in cfg.DISTILL.HEADS], path
