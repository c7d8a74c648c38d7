"""Tests over every head (or several): degenerate ground truth, images without boxes, RetinaNet levels."""

import copy
import glob
import itertools
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2kd import DistillTrainer
from d2kd.data.mapper import SafeDatasetMapper
from d2kd.data.subset import register_subset_dataset
from d2kd.heads import DISTILL_HEAD_REGISTRY, BuildContext, DistillConfigError, build_distill_heads
from d2kd.modeling.distiller import DistillationModel
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import build_teacher, build_teacher_cfg

from conftest import (
    CONFIGS,
    FITNET,
    RETINA_LEVELS,
    RETINA_STUDENT,
    distill_cfg,
    heads_cfg,
    save_random_checkpoint,
    smaller,
    step,
    synthetic_batch,
)


# ---------------------------------------------------------------------------------------
# Every registered head on images with no box, a crowd box and a 1x1 px box
# ---------------------------------------------------------------------------------------


def registered_heads():
    return sorted(cls.registry_name() for _, cls in DISTILL_HEAD_REGISTRY)


def config_for_head(name: str) -> str:
    """The head's BCCD config, else any BCCD config of it (e.g. RetinaNet), else fitnet's + HEADS."""
    exact = os.path.join("bccd", f"distill_{name}_R50_R18.yaml")
    if os.path.isfile(os.path.join(CONFIGS, exact)):
        return exact
    others = sorted(glob.glob(os.path.join(CONFIGS, "bccd", f"distill_{name}_*.yaml")))
    return os.path.relpath(others[0], CONFIGS) if others else FITNET


def degenerate_batch(cfg):
    """Three BCCD images through the training mapper: no box; a crowd box + a box; a 1x1 px box."""
    dicts = copy.deepcopy(DatasetCatalog.get("bccd_train")[:3])
    normal = dicts[1]["annotations"][0]
    dicts[0]["annotations"] = []
    crowd = dict(normal, bbox=[50.0, 40.0, 400.0, 300.0], iscrowd=1)
    dicts[1]["annotations"] = [crowd, normal]
    dicts[2]["annotations"] = [dict(normal, bbox=[100.0, 100.0, 101.0, 101.0], category_id=2)]
    mapper = SafeDatasetMapper(cfg, True)
    batch = [mapper(d) for d in dicts]
    assert [len(x["instances"]) for x in batch] == [0, 1, 1], "crowd boxes are dropped by the mapper"
    assert float(batch[2]["instances"].gt_boxes.area()[0]) < 1.0  # smaller than a pixel after resize
    return batch


@pytest.mark.train
@pytest.mark.parametrize("head", registered_heads())
def test_every_head_handles_empty_crowd_and_tiny_boxes(tmp_path, head):
    """
    One training step at a late iteration (past every warm-up) of the head's BCCD config on
    a hand-made batch; the teacher has the student's architecture (random weights).
    """
    config = config_for_head(head)
    weights = save_random_checkpoint(config, str(tmp_path / "teacher.pth"))
    # A small training set keeps hooks that read it (e.g. GKD's prototypes) fast.
    register_subset_dataset("robust_bccd_train_12", "bccd_train", 12)
    cfg = distill_cfg(
        config,
        tmp_path / "run",
        weights,
        teacher_config=config,
        opts=["DISTILL.HEADS", [head], "DISTILL.WARMUP_ITERS", 0, "DISTILL.STOP_ITER", -1,
              "DATASETS.TRAIN", ("robust_bccd_train_12",)],
        max_iter=2000,
    )
    smaller(cfg)
    trainer = DistillTrainer(cfg)
    batch = degenerate_batch(cfg)
    trainer._trainer._data_loader_iter_obj = (copy.deepcopy(batch) for _ in itertools.count())
    trainer.checkpointer.save_to_disk = False
    trainer.start_iter, trainer.max_iter = 1000, 1001
    trainer.train()  # the non-finite guard raises naming the term if a loss is NaN/inf

    kd_terms = [k for k in trainer.storage.histories() if k.startswith(f"loss_kd_{head}")]
    assert kd_terms, f"head {head} logged no loss term"
    for k in kd_terms:
        value = trainer.storage.history(k).latest()
        assert torch.isfinite(torch.tensor(value)), f"{k} = {value}"


# ---------------------------------------------------------------------------------------
# Box-driven heads on real models: images without boxes, no gradient to the teacher
# ---------------------------------------------------------------------------------------


ALL_HEADS = ["fgfi", "defeat", "fgd"]


@pytest.mark.train
def test_real_models_images_without_boxes_and_no_teacher_gradient(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(
        "bccd/distill_fgfi_R50_R18.yaml",
        tmp_path,
        teacher_r18_weights,
        opts=["DISTILL.HEADS", ALL_HEADS, "DISTILL.FGFI.WARMUP_ITERS", 0],
    )
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher, teacher_cfg = build_teacher(cfg)
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher_cfg))
    model = DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg))
    model.train()

    def image(boxes):
        inst = Instances((128, 160))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
        return {"image": torch.rand(3, 128, 160) * 255, "instances": inst, "height": 128, "width": 160}

    for batch in ([image([]), image([])], [image([[20, 30, 60, 70]]), image([])]):
        with EventStorage(0):
            losses = model(batch)
        kd = {k: v for k, v in losses.items() if k.startswith("loss_kd")}
        assert {k.split("_")[2] for k in kd} == set(ALL_HEADS)
        assert all(torch.isfinite(v).all() for v in kd.values()), kd
        model.zero_grad()
        sum(losses.values()).backward()
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        trainable = [p for p in heads.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
    assert losses["loss_kd_fgfi_p2"].item() > 0 and losses["loss_kd_defeat_p2_fg"].item() > 0


# ---------------------------------------------------------------------------------------
# RetinaNet: two-stage-only methods are build-time errors; feature heads on p3..p7
# ---------------------------------------------------------------------------------------


# Two-stage-only methods: (head, options that keep its two-stage part on, expected message).
TWO_STAGE_ONLY = [
    ("kd", [], "RoI box head"),
    ("chen2017", ["DISTILL.CHEN2017.STAGES", ["rcn"], "DISTILL.CHEN2017.HINT.ENABLED", False], "RoI box head"),
    ("chen2017", ["DISTILL.CHEN2017.STAGES", ["rpn"], "DISTILL.CHEN2017.HINT.ENABLED", False], "RPN"),
    ("defeat", ["DISTILL.DEFEAT.NECK_KD", False, "DISTILL.DEFEAT.IN_FEATURES", RETINA_LEVELS], "RoI box head"),
]


@pytest.mark.parametrize("head,opts,match", TWO_STAGE_ONLY, ids=[f"{h}-{i}" for i, (h, _, _) in enumerate(TWO_STAGE_ONLY)])
def test_two_stage_methods_on_retinanet_are_build_time_errors(retina_pair, retina_models, head, opts, match):
    if head.lower() not in {n.lower() for n, _ in DISTILL_HEAD_REGISTRY}:
        pytest.skip(f"head {head} is not registered yet")
    cfg = heads_cfg(retina_pair, [head], opts)
    student, teacher = retina_models
    with pytest.raises(DistillConfigError, match=match) as info:
        build_distill_heads(cfg, BuildContext(student, teacher, cfg, build_teacher_cfg(cfg)))
    assert "RetinaNet" in str(info.value), "the error should name the detector that lacks the part"


# Feature heads on RetinaNet levels p3..p7: (head, its RetinaNet config or None, options).
FEATURE_HEADS = [
    ("fitnet", "bccd/distill_fitnet_retinanet_R50_R18.yaml", []),
    ("cwd", "bccd/distill_cwd_retinanet_R50_R18.yaml", []),
    ("fgd", "bccd/distill_fgd_retinanet_R50_R18.yaml", []),
    ("fgfi", "bccd/distill_fgfi_retinanet_R50_R18.yaml", ["DISTILL.FGFI.WARMUP_ITERS", 0]),
    ("defeat", "bccd/distill_defeat_retinanet_R50_R18.yaml", []),
    ("fbkd", None, ["DISTILL.FBKD.IN_FEATURES", RETINA_LEVELS]),
    ("hgd", None, ["DISTILL.HGD.IN_FEATURES", ["res3", "res4", "res5"] + RETINA_LEVELS]),
    (
        "chen2017",
        None,
        ["DISTILL.CHEN2017.CLS.ENABLED", False, "DISTILL.CHEN2017.REG.ENABLED", False, "DISTILL.CHEN2017.HINT.IN_FEATURES", RETINA_LEVELS],
    ),
]


@pytest.mark.train
@pytest.mark.parametrize("head,config,opts", FEATURE_HEADS, ids=[h for h, _, _ in FEATURE_HEADS])
def test_feature_heads_on_retinanet_levels(tmp_path, retina_r18_weights, retina_models, head, config, opts):
    """One training forward on RetinaNet p3..p7 (one image without ground truth): finite terms."""
    if head.lower() not in {n.lower() for n, _ in DISTILL_HEAD_REGISTRY}:
        pytest.skip(f"head {head} is not registered yet")
    config = config or "bccd/distill_fitnet_retinanet_R50_R18.yaml"
    cfg = distill_cfg(config, tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT, opts=opts)
    cfg.DISTILL.HEADS = [head, "densekd"]
    student, teacher = retina_models
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, build_teacher_cfg(cfg)))
    model = DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg))
    try:
        losses = step(model, synthetic_batch())
    finally:
        model.student_recorder.remove()
        model.teacher_recorder.remove()
    kd = {k: v for k, v in losses.items() if k.startswith(f"loss_kd_{head}")}
    assert kd, f"{head} returned no term: {sorted(losses)}"
    assert all(torch.isfinite(v).all() for v in losses.values()), {k: float(v) for k, v in losses.items()}
    assert all(f"loss_kd_densekd_{l}" in losses for l in RETINA_LEVELS)
    sum(v for v in kd.values()).backward()  # the student side gets gradients
    assert any(p.grad is not None for p in student.backbone.parameters())
    student.zero_grad(set_to_none=True)
