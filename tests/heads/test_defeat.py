"""DeFeat (docs/methods/defeat.md): decoupled neck and RoI terms against numpy, build errors, the adapter."""

import numpy as np
import pytest
import torch
from detectron2.structures import Instances

from d2kd import get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import DistillConfigError
from d2kd.heads.defeat import DeFeat

from conftest import backbone_records, fake_rcnn_context, gt_instances, gt_step, np_softmax


def _defeat_cfg(**opts):
    cfg = get_distill_cfg()
    cfg.DISTILL.DEFEAT.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.DEFEAT.ADAPTER.ENABLED = False
    for k, v in opts.items():
        cfg.DISTILL.DEFEAT[k] = v
    return cfg


def test_defeat_neck_masks_and_normalisers_golden():
    head = DeFeat(_defeat_cfg(ROI_KD=False, CANONICAL_BOX_SIZE=16), fake_rcnn_context())
    assert head.teacher_parts == {"backbone"}
    gen = torch.Generator().manual_seed(1)
    s = {"p2": torch.randn(2, 2, 8, 8, generator=gen), "p3": torch.randn(2, 2, 4, 4, generator=gen)}
    t = {"p2": torch.randn(2, 2, 8, 8, generator=gen), "p3": torch.randn(2, 2, 4, 4, generator=gen)}
    # Canonical size 16: box A (sqrt area 4) -> level 2, box B (sqrt area 8) -> level 3.
    step = gt_step([gt_instances([[4, 4, 8, 8], [8, 16, 16, 24]]), gt_instances([])])
    out = head(backbone_records(s), backbone_records(t), step)
    assert set(out) == {"p2_fg", "p2_bg", "p3_fg", "p3_bg"}
    m2 = np.zeros((2, 8, 8))
    m2[0, 1, 1] = 1  # A on stride 4: x [1, 2), y [1, 2)
    m3 = np.zeros((2, 4, 4))
    m3[0, 2, 1] = 1  # B on stride 8: x [1, 2), y [2, 3)
    for name, m in (("p2", m2), ("p3", m3)):
        sq = (s[name].numpy() - t[name].numpy()) ** 2  # (B, C, H, W), C = 2
        fg = (sq * m[:, None]).sum() / max(1.0, 2 * 2 * m.sum())
        bg = (sq * (1 - m[:, None])).sum() / max(1.0, 2 * 2 * (1 - m).sum())
        assert out[f"{name}_fg"].item() == pytest.approx(3.0 * fg / 2, rel=1e-5)
        assert out[f"{name}_bg"].item() == pytest.approx(12.0 * bg / 2, rel=1e-5)
    # No box anywhere: fg terms are 0, bg terms average over every cell.
    empty = head(backbone_records(s), backbone_records(t), gt_step([gt_instances([]), gt_instances([])]))
    assert empty["p2_fg"].item() == 0.0
    sq = (s["p3"].numpy() - t["p3"].numpy()) ** 2
    assert empty["p3_bg"].item() == pytest.approx(12.0 * sq.sum() / (2 * 2 * 32) / 2, rel=1e-5)


def test_defeat_roi_decoupled_kl_golden():
    head = DeFeat(_defeat_cfg(NECK_KD=False, NEG_TEMPERATURE=2.0, POS_WEIGHT=2.0, NEG_WEIGHT=0.5), fake_rcnn_context())
    assert head.teacher_parts == {"roi_box"}
    zs = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    zt = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, -1.0], [0.0, 0.0, 2.0]])
    proposals = Instances((32, 32))
    proposals.gt_classes = torch.tensor([0, 2, 1, 2])  # K = 2: rows 0, 2 positive, rows 1, 3 background
    student = Records(
        {
            "roi_heads.box_predictor": [((), (torch.tensor(zs, requires_grad=True), None))],
            "roi_heads.label_and_sample_proposals": [((), [proposals])],
        }
    )
    teacher = Records({"roi_heads.box_predictor": [((), (torch.tensor(zt), None))]})
    out = head(student, teacher, gt_step([gt_instances([])]))

    def kl(rows, temp):
        p, q = np_softmax(zs[rows] / temp, 1), np_softmax(zt[rows] / temp, 1)
        return temp**2 * np.mean(np.sum(q * np.log(q / p), axis=1))

    assert out["roi_pos"].item() == pytest.approx(2.0 * kl([0, 2], 1.0), rel=1e-6)
    assert out["roi_neg"].item() == pytest.approx(0.5 * kl([1, 3], 2.0), rel=1e-6)
    # All background (an image without boxes): the positive term is a zero.
    proposals.gt_classes = torch.tensor([2, 2, 2, 2])
    out = head(student, teacher, gt_step([gt_instances([])]))
    assert out["roi_pos"].item() == 0.0 and out["roi_neg"].item() > 0


def test_defeat_config_errors_and_adapter():
    with pytest.raises(DistillConfigError, match="NECK_KD and .*ROI_KD are both False"):
        DeFeat(_defeat_cfg(NECK_KD=False, ROI_KD=False), fake_rcnn_context())
    with pytest.raises(DistillConfigError, match="MASK_CONVENTION"):
        DeFeat(_defeat_cfg(MASK_CONVENTION="round"), fake_rcnn_context())
    cfg = _defeat_cfg()
    cfg.DISTILL.DEFEAT.ADAPTER.ENABLED = True
    head = DeFeat(cfg, fake_rcnn_context())
    adapter = head.pairing.adapters["p3"]
    assert adapter.conv.kernel_size == (3, 3) and not adapter.relu
    assert adapter.conv.weight.std().item() == pytest.approx(1e-4, rel=0.2)


@pytest.mark.parametrize("config", ["bccd/distill_defeat_retinanet_R50_R18.yaml", "bccd/distill_fgfi_retinanet_R50_R18.yaml"])
def test_scale_assignment_follows_the_one_stage_rule_on_retinanet(config, retina_models, tmp_path):
    """On a one-stage student the box-to-level rule puts 112 px (not 224 px) at level 4, as the official
    one-stage codes do; a configured CANONICAL_BOX_SIZE is kept."""
    from d2kd.heads import DISTILL_HEAD_REGISTRY
    from d2kd.step import BuildContext
    from conftest import load_test_cfg

    student, teacher = retina_models
    cfg = load_test_cfg(config, tmp_path)
    head_class = DISTILL_HEAD_REGISTRY.get({"defeat": "DeFeat", "fgfi": "FGFI"}[cfg.DISTILL.HEADS[0]])
    context = BuildContext(student, teacher, cfg, cfg)
    assert head_class(cfg, context).canonical_box_size == 112.0
    cfg.DISTILL[head_class.config_key()].CANONICAL_BOX_SIZE = 160
    assert head_class(cfg, context).canonical_box_size == 160.0


def test_scale_assignment_keeps_the_two_stage_rule_on_faster_rcnn():
    from conftest import fake_rcnn_context

    from d2kd.config import get_distill_cfg
    from d2kd.heads.defeat import DeFeat

    cfg = get_distill_cfg()
    cfg.DISTILL.DEFEAT.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.DEFEAT.ROI_KD = False
    assert DeFeat(cfg, fake_rcnn_context()).canonical_box_size == 224.0
