"""Shipped presets of FBKD, CWD, FGFI, DeFeat and FGD: the COCO configs load; BCCD runs log finite terms."""

import math
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

from d2kd.config import merge_config
from d2kd import DistillTrainer, get_distill_cfg

from conftest import CONFIGS, distill_cfg


def test_coco_configs_load():
    from d2kd.config.loader import resolve_config_file

    for name, head in (("distill_fbkd_R101_R50.yaml", "fbkd"), ("distill_cwd_R101_R50.yaml", "cwd")):
        cfg = get_distill_cfg()
        merge_config(cfg, os.path.join(CONFIGS, "coco", name))
        assert cfg.DISTILL.HEADS == [head]
        assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.FPN.OUT_CHANNELS == 256
        assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        assert os.path.isfile(resolve_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE))
    assert cfg.DISTILL.CWD.WEIGHT == 10.0 and cfg.DISTILL.CWD.TAU == 1.0


@pytest.mark.train
@pytest.mark.parametrize(
    "config, head, form",
    [
        ("bccd/distill_fbkd_R50_R18.yaml", "fbkd", "code"),
        ("bccd/distill_fbkd_paper_R50_R18.yaml", "fbkd", "paper"),
        ("bccd/distill_cwd_R50_R18.yaml", "cwd", None),
    ],
    ids=["fbkd_code", "fbkd_paper", "cwd"],
)
def test_two_iteration_bccd_run(tmp_path, teacher_r18_weights, config, head, form):
    cfg = distill_cfg(config, tmp_path, teacher_r18_weights)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher = trainer.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()

    levels = ["p2", "p3", "p4", "p5", "p6"]
    if head == "fbkd":
        assert cfg.DISTILL.FBKD.FORM == form
        assert cfg.DISTILL.FBKD.CHANNEL_MASK == (form == "paper")
        keys = [f"loss_kd_fbkd_{l}_{t}" for l in levels for t in ("am", "at_c", "at_s", "nld")]
        # 128-channel FPN: official C_i scaled to 32 (P2, P3) and 64 (P4-P6).
        nl = trainer.heads["fbkd"].teacher_non_local
        assert [nl[l].inner_channels for l in levels] == [32, 32, 64, 64, 64]
        # NL_T is trained by the optimizer (not frozen), its zero-initialised norm moved.
        optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert {id(p) for p in nl.parameters()} <= optimised
        assert any(nl[l].norm.weight.abs().sum() > 0 for l in levels)
    else:
        keys = [f"loss_kd_cwd_{l}" for l in levels]
    histories = trainer.storage.histories()
    for key in keys:
        values = histories[key].values()
        assert len(values) == 2 and all(math.isfinite(v) for v, _ in values), key
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher parameter {k} changed"

    # An image without ground-truth boxes goes through the distillation step.
    batch = next(iter(trainer.data_loader))
    batch[0]["instances"] = batch[0]["instances"][:0]
    trainer.model.train()
    with EventStorage(0):
        losses = trainer.model(batch)
    kd = {k: v for k, v in losses.items() if k.startswith(f"loss_kd_{head}")}
    assert len(kd) == len(keys) and all(torch.isfinite(v) for v in kd.values())


@pytest.mark.train
@pytest.mark.parametrize(
    "config, head, extra",
    [
        ("bccd/distill_fgfi_R50_R18.yaml", "fgfi", ["DISTILL.FGFI.WARMUP_ITERS", 0]),
        ("bccd/distill_defeat_R50_R18.yaml", "defeat", []),
        ("bccd/distill_fgd_R50_R18.yaml", "fgd", []),
    ],
)
def test_bccd_two_iterations_log_finite_terms(tmp_path, teacher_r18_weights, config, head, extra):
    cfg = distill_cfg(config, tmp_path, teacher_r18_weights, opts=extra)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    histories = trainer.storage.histories()
    keys = sorted(k for k in histories if k.startswith(f"loss_kd_{head}"))
    expected = {
        "fgfi": [f"loss_kd_fgfi_p{i}" for i in range(2, 7)],
        "defeat": [f"loss_kd_defeat_p{i}_{t}" for i in range(2, 7) for t in ("bg", "fg")]
        + ["loss_kd_defeat_roi_neg", "loss_kd_defeat_roi_pos"],
        "fgd": [f"loss_kd_fgd_p{i}_{t}" for i in range(2, 6) for t in ("at", "bg", "fg", "glb")],
    }[head]
    assert keys == sorted(expected)
    for k in keys:
        values = [v for v, _ in histories[k].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (k, values)
    assert any(histories[k].values()[-1][0] > 0 for k in keys)


def test_configs_load_with_their_options():
    from conftest import CONFIGS
    import os

    for name in ("distill_fgfi_R101_R50", "distill_defeat_R101_R50", "distill_fgd_R101_R50"):
        cfg = get_distill_cfg()
        merge_config(cfg, os.path.join(CONFIGS, "coco", name + ".yaml"))
        assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.DISTILL.HEADS == [name.split("_")[1]]
    cfg = get_distill_cfg()
    merge_config(cfg, os.path.join(CONFIGS, "coco", "distill_fgfi_R101_R50.yaml"))
    assert cfg.DISTILL.FGFI.WARMUP_ITERS == 400
