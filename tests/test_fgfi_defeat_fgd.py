"""FGFI, DeFeat and FGD (docs/methods/fgfi.md, 5.4, 5.7): masks, losses, empty images, BCCD runs."""

import math

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2kd.config import merge_config
from d2kd import DistillTrainer, get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import BuildContext, DistillConfigError, StepInputs, build_distill_heads
from d2kd.heads.defeat import DeFeat
from d2kd.heads.fgd import FGD, fgd_masks
from d2kd.heads.fgfi import FGFI
from d2kd.modeling.box_masks import box_windows, level_box_masks
from d2kd.modeling.distiller import DistillationModel
from d2kd.heads.fgd.gc_block import GlobalContextBlock
from d2kd.heads.fgfi.imitation_mask import imitation_mask
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import build_teacher

from conftest import distill_cfg

# --------------------------------------------------------------------------------------------
# Fakes: a model that only reports shapes, and hand-made records / step inputs.


class _Backbone(nn.Module):
    def __init__(self, channels, strides):
        super().__init__()
        self.shapes = {f"p{int(math.log2(s))}": ShapeSpec(channels=channels, stride=s) for s in strides}

    def output_shape(self):
        return self.shapes


class _Model(nn.Module):
    """Shapes of a GeneralizedRCNN: backbone levels, an RPN anchor generator, a box predictor."""

    def __init__(self, channels=2, strides=(4, 8), anchor_features=("p2", "p3"), num_classes=2):
        super().__init__()
        self.backbone = _Backbone(channels, strides)
        self.proposal_generator = nn.Module()
        self.proposal_generator.anchor_generator = nn.Module()
        self.proposal_generator.in_features = list(anchor_features)
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = nn.Module()
        self.roi_heads.num_classes = num_classes


def _context(student=None, teacher=None):
    return BuildContext(student or _Model(), teacher or _Model(), None, None)


def _instances(boxes, hw=(32, 32)):
    inst = Instances(hw)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
    return inst


def _step(instances, iteration=0, image_sizes=None, padded=(32, 32)):
    sizes = image_sizes or [padded] * len(instances)
    images = ImageList(torch.zeros(len(instances), 3, *padded), sizes)
    return StepInputs([], instances, images, None, iteration)


def _records(features, **extra):
    data = {"backbone": [((), features)]}
    data.update({k.replace("__", "."): [((), v)] for k, v in extra.items()})
    return Records(data)


def _softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# FGFI imitation mask


def _hand_anchors():
    """2x2 map, stride 10, per cell a 10x10 anchor (a0) and a 20x20 anchor (a1), order (h, w, a)."""
    out = []
    for y in range(2):
        for x in range(2):
            out.append([10 * x, 10 * y, 10 * x + 10, 10 * y + 10])
            out.append([10 * x - 5, 10 * y - 5, 10 * x + 15, 10 * y + 15])
    return torch.tensor(out, dtype=torch.float32)


def test_imitation_mask_hand_computed_ious():
    anchors = _hand_anchors()
    g = torch.tensor([[5.0, 0.0, 15.0, 10.0]])
    # IoUs with g (area 100): cell (0,0): a0 50/150 = 1/3, a1 100/400 = 0.25; cell (0,1): a0 1/3,
    # a1 0.25; cell (1,0): a0 0, a1 50/450 = 0.111; cell (1,1): a0 0, a1 0.111. Max 1/3.
    assert imitation_mask(anchors, g, (2, 2), 0.5).tolist() == [[1, 1], [0, 0]]  # F = 1/6
    assert imitation_mask(anchors, g, (2, 2), 0.34).tolist() == [[1, 1], [0, 0]]  # F = 0.1133
    assert imitation_mask(anchors, g, (2, 2), 0.3).tolist() == [[1, 1], [1, 1]]  # F = 0.1 < 0.111
    # A second box equal to a0 of cell (1,1): IoU 1 there, a1 of (1,1) 0.25, (0,1) a1 0.111: F = 0.5.
    g2 = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    assert imitation_mask(anchors, g2, (2, 2), 0.5).tolist() == [[0, 0], [0, 1]]
    # Union over boxes; each box has its own threshold.
    assert imitation_mask(anchors, torch.cat([g, g2]), (2, 2), 0.5).tolist() == [[1, 1], [0, 1]]
    # Threshold is strict: psi = 0.75 on g gives F = 0.25, and the 0.25 IoUs do not count,
    # but the 1/3 ones do.
    assert imitation_mask(anchors, g, (2, 2), 0.75).tolist() == [[1, 1], [0, 0]]
    assert imitation_mask(anchors, g2, (2, 2), 0.25).tolist() == [[0, 0], [0, 1]]
    assert imitation_mask(anchors, torch.zeros(0, 4), (2, 2), 0.5).tolist() == [[0, 0], [0, 0]]


def test_imitation_mask_layout_follows_detectron2_anchor_order():
    gen = DefaultAnchorGenerator(sizes=[[10]], aspect_ratios=[[1.0]], strides=[10], offset=0.0)
    anchors = gen([torch.zeros(1, 1, 2, 3)])[0].tensor  # anchors centred on (10x, 10y)
    top_right = torch.tensor([[15.0, -5.0, 25.0, 5.0]])  # exactly the anchor of cell (y=0, x=2)
    assert imitation_mask(anchors, top_right, (2, 3)).tolist() == [[0, 0, 1], [0, 0, 0]]
    bottom_left = torch.tensor([[-5.0, 5.0, 5.0, 15.0]])
    assert imitation_mask(anchors, bottom_left, (2, 3)).tolist() == [[0, 0, 0], [1, 0, 0]]


# --------------------------------------------------------------------------------------------
# Box windows and per-level masks (DeFeat)


def test_box_window_conventions():
    b = torch.tensor([[4.0, 4.0, 12.0, 10.0]])
    # stride 4: x/4 in [1, 3], y/4 in [1, 2.5]
    assert box_windows(b, 4, (5, 5), "inclusive").tolist() == [[1, 1, 4, 3]]
    assert box_windows(b, 4, (5, 5), "exclusive").tolist() == [[1, 1, 3, 2]]
    assert box_windows(b, 4, (5, 5), "outward").tolist() == [[1, 1, 4, 4]]
    # DeFeat's degenerate rule: empty in either direction -> only the top-left cell.
    assert box_windows(torch.tensor([[5.0, 5.0, 7.0, 7.0]]), 4, (5, 5), "exclusive").tolist() == [[1, 1, 2, 2]]
    assert box_windows(torch.tensor([[5.0, 4.0, 7.0, 16.0]]), 4, (5, 5), "exclusive").tolist() == [[1, 1, 2, 2]]
    # Clipped to the map.
    assert box_windows(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 4, (5, 5), "outward").tolist() == [[0, 0, 5, 5]]
    with pytest.raises(ValueError, match="convention"):
        box_windows(b, 4, (5, 5), "round")


def test_level_box_masks_assign_boxes_by_scale():
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    levels = {n: int(n[1]) for n in strides}
    sizes = {n: (1024 // s, 1024 // s) for n, s in strides.items()}
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 40.0],  # sqrt(area) 40 < 112 -> P2
            [0.0, 0.0, 150.0, 150.0],  # 150 in [112, 224) -> P3
            [0.0, 0.0, 1000.0, 1000.0],  # 1000 >= 896 -> P6 (five levels)
        ]
    )
    masks = level_box_masks([boxes, torch.zeros(0, 4)], levels, strides, sizes)
    # "exclusive" windows: [0, floor(x2/s)) -> 10, 18 (150/8 = 18.75) and 15 (1000/64) cells a side.
    assert {n: masks[n][0].sum().item() for n in strides} == {"p2": 100, "p3": 324, "p4": 0, "p5": 0, "p6": 225}
    assert all(masks[n][1].sum().item() == 0 for n in strides), "an image without boxes has empty masks"
    assert masks["p2"][0, :10, :10].min().item() == 1 and masks["p2"].shape == (2, 256, 256)
    unassigned = level_box_masks([boxes], levels, strides, sizes, assign_by_scale=False)
    assert unassigned["p2"].sum().item() == 250 * 250


# --------------------------------------------------------------------------------------------
# FGFI head


def _fgfi_cfg(**opts):
    cfg = get_distill_cfg()
    cfg.DISTILL.FGFI.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.FGFI.ADAPTER.ENABLED = False
    cfg.DISTILL.FGFI.WARMUP_ITERS = 0
    cfg.DISTILL.FGFI.ASSIGN_BY_SCALE = False
    for k, v in opts.items():
        cfg.DISTILL.FGFI[k] = v
    return cfg


def test_fgfi_loss_golden():
    head = FGFI(_fgfi_cfg(), _context())
    gen = torch.Generator().manual_seed(0)
    s = {"p2": torch.randn(2, 2, 2, 2, generator=gen), "p3": torch.randn(2, 2, 1, 1, generator=gen)}
    t = {"p2": torch.randn(2, 2, 2, 2, generator=gen), "p3": torch.randn(2, 2, 1, 1, generator=gen)}
    # p3: one cell with a 20x20 anchor (IoU 0.25 with g) and a far one (IoU 0): F = 0.125, cell in.
    anchors = [Boxes(_hand_anchors()), Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 110.0, 110.0]]))]
    step = _step([_instances([[5, 0, 15, 10]]), _instances([])])
    out = head(_records(s, proposal_generator__anchor_generator=anchors), _records(t), step)
    assert set(out) == {"p2", "p3"}
    # Image 0: p2 mask = top row (test above), p3 mask = [[1]]; image 1 has no box: empty masks.
    masks = {"p2": np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]]), "p3": np.array([[[1]], [[0]]])}
    for name, m in masks.items():
        sq = ((s[name].numpy() - t[name].numpy()) ** 2).sum(axis=1)  # (B, H, W), summed over C
        expected = 0.01 * (m * sq).sum() / (2 * m.sum()) / 2  # lambda * L_l / n_levels
        assert out[name].item() == pytest.approx(float(expected), rel=1e-5)


def test_fgfi_assigns_boxes_to_levels_and_warms_up():
    cfg = _fgfi_cfg(ASSIGN_BY_SCALE=True, CANONICAL_BOX_SIZE=16, WARMUP_ITERS=5)
    head = FGFI(cfg, _context())
    s = {"p2": torch.randn(1, 2, 2, 2), "p3": torch.randn(1, 2, 1, 1)}
    t = {"p2": torch.randn(1, 2, 2, 2), "p3": torch.randn(1, 2, 1, 1)}
    anchors = [Boxes(_hand_anchors()), Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 110.0, 110.0]]))]
    records = _records(s, proposal_generator__anchor_generator=anchors)
    # sqrt(area) 10 with canonical size 16: floor(4 + log2(10/16)) = 3 -> only on p3.
    step = _step([_instances([[5, 0, 15, 10]])], iteration=5)
    out = head(records, _records(t), step)
    assert out["p2"].item() == 0.0
    sq3 = ((s["p3"] - t["p3"]) ** 2).sum().item()
    assert out["p3"].item() == pytest.approx(0.01 * sq3 / 2 / 2, rel=1e-5)
    warm = head(records, _records(t), _step([_instances([[5, 0, 15, 10]])], iteration=4))
    assert all(v.item() == 0.0 for v in warm.values())


def test_fgfi_adapter_and_config_errors():
    torch.manual_seed(0)  # the std of a small random adapter is checked below
    cfg = _fgfi_cfg()
    cfg.DISTILL.FGFI.ADAPTER.ENABLED = True
    head = FGFI(cfg, _context())
    conv = head.pairing.adapters["p2"].conv
    assert conv.kernel_size == (3, 3) and head.pairing.adapters["p2"].relu
    assert conv.weight.std().item() == pytest.approx(1e-4, rel=0.2)
    assert head.student_modules == ["backbone", "proposal_generator.anchor_generator"]
    with pytest.raises(DistillConfigError, match="carry no anchors"):
        FGFI(_fgfi_cfg(), _context(student=_Model(anchor_features=("p2",))))
    with pytest.raises(DistillConfigError, match="PSI"):
        FGFI(_fgfi_cfg(PSI=0.0), _context())


# --------------------------------------------------------------------------------------------
# DeFeat head


def _defeat_cfg(**opts):
    cfg = get_distill_cfg()
    cfg.DISTILL.DEFEAT.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.DEFEAT.ADAPTER.ENABLED = False
    for k, v in opts.items():
        cfg.DISTILL.DEFEAT[k] = v
    return cfg


def test_defeat_neck_masks_and_normalisers_golden():
    head = DeFeat(_defeat_cfg(ROI_KD=False, CANONICAL_BOX_SIZE=16), _context())
    assert head.teacher_parts == {"backbone"}
    gen = torch.Generator().manual_seed(1)
    s = {"p2": torch.randn(2, 2, 8, 8, generator=gen), "p3": torch.randn(2, 2, 4, 4, generator=gen)}
    t = {"p2": torch.randn(2, 2, 8, 8, generator=gen), "p3": torch.randn(2, 2, 4, 4, generator=gen)}
    # Canonical size 16: box A (sqrt area 4) -> level 2, box B (sqrt area 8) -> level 3.
    step = _step([_instances([[4, 4, 8, 8], [8, 16, 16, 24]]), _instances([])])
    out = head(_records(s), _records(t), step)
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
    empty = head(_records(s), _records(t), _step([_instances([]), _instances([])]))
    assert empty["p2_fg"].item() == 0.0
    sq = (s["p3"].numpy() - t["p3"].numpy()) ** 2
    assert empty["p3_bg"].item() == pytest.approx(12.0 * sq.sum() / (2 * 2 * 32) / 2, rel=1e-5)


def test_defeat_roi_decoupled_kl_golden():
    head = DeFeat(_defeat_cfg(NECK_KD=False, NEG_TEMPERATURE=2.0, POS_WEIGHT=2.0, NEG_WEIGHT=0.5), _context())
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
    out = head(student, teacher, _step([_instances([])]))

    def kl(rows, temp):
        p, q = _softmax(zs[rows] / temp, 1), _softmax(zt[rows] / temp, 1)
        return temp**2 * np.mean(np.sum(q * np.log(q / p), axis=1))

    assert out["roi_pos"].item() == pytest.approx(2.0 * kl([0, 2], 1.0), rel=1e-6)
    assert out["roi_neg"].item() == pytest.approx(0.5 * kl([1, 3], 2.0), rel=1e-6)
    # All background (an image without boxes): the positive term is a zero.
    proposals.gt_classes = torch.tensor([2, 2, 2, 2])
    out = head(student, teacher, _step([_instances([])]))
    assert out["roi_pos"].item() == 0.0 and out["roi_neg"].item() > 0


def test_defeat_config_errors_and_adapter():
    with pytest.raises(DistillConfigError, match="NECK_KD and .*ROI_KD are both False"):
        DeFeat(_defeat_cfg(NECK_KD=False, ROI_KD=False), _context())
    with pytest.raises(DistillConfigError, match="MASK_CONVENTION"):
        DeFeat(_defeat_cfg(MASK_CONVENTION="round"), _context())
    cfg = _defeat_cfg()
    cfg.DISTILL.DEFEAT.ADAPTER.ENABLED = True
    head = DeFeat(cfg, _context())
    adapter = head.pairing.adapters["p3"]
    assert adapter.conv.kernel_size == (3, 3) and not adapter.relu
    assert adapter.conv.weight.std().item() == pytest.approx(1e-4, rel=0.2)


# --------------------------------------------------------------------------------------------
# FGD


def test_fgd_scale_mask_with_overlapping_boxes():
    # Boxes in map cells on a 6x8 map. A covers [0, 2] x [0, 2] (9 cells, 1/9); B covers
    # x [1, 5], y [1, 3] (15 cells, 1/15); their overlap keeps the larger 1/9.
    fg, bg = fgd_masks(torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 5.0, 3.0]]), (6, 8))
    expected = np.zeros((6, 8))
    expected[1:4, 1:6] = 1 / 15
    expected[0:3, 0:3] = 1 / 9
    np.testing.assert_allclose(fg.numpy(), expected, rtol=1e-6)
    n_fg = 9 + 15 - 4
    np.testing.assert_allclose(bg.numpy(), (expected == 0) / (48 - n_fg), rtol=1e-6)
    # Fractional coordinates round outwards (floor, ceil); the area is counted before clipping:
    # x [7, 8] on an 8-wide map keeps one column but the value is 1 / (2 * 2).
    fg, _ = fgd_masks(torch.tensor([[7.2, 4.5, 8.0, 5.0]]), (6, 8))
    assert fg[4:6, 7].tolist() == [0.25, 0.25] and fg.sum().item() == pytest.approx(0.5)
    # No boxes: no foreground, a uniform background.
    fg, bg = fgd_masks(torch.zeros(0, 4), (2, 3))
    assert fg.sum().item() == 0 and np.allclose(bg.numpy(), 1 / 6)


def _gc_numpy(block, x):
    """GC(x) from the block's weights, with plain numpy."""
    x = x.detach().numpy()
    b, c, h, w = x.shape
    wk = block.conv_mask.weight.detach().numpy().reshape(c)
    bk = block.conv_mask.bias.detach().numpy()[0]
    conv1, ln, _, conv2 = block.channel_add
    w1, b1 = conv1.weight.detach().numpy()[:, :, 0, 0], conv1.bias.detach().numpy()
    g, beta = ln.weight.detach().numpy().reshape(-1), ln.bias.detach().numpy().reshape(-1)
    w2, b2 = conv2.weight.detach().numpy()[:, :, 0, 0], conv2.bias.detach().numpy()
    out = np.empty_like(x)
    for i in range(b):
        flat = x[i].reshape(c, h * w)
        attn = _softmax(wk @ flat + bk, 0)
        ctx = flat @ attn  # (C,)
        hdn = w1 @ ctx + b1
        hdn = (hdn - hdn.mean()) / np.sqrt(hdn.var() + 1e-5) * g + beta
        add = w2 @ np.maximum(hdn, 0) + b2
        out[i] = x[i] + add[:, None, None]
    return out


def test_gc_block_matches_plain_formula_and_starts_as_identity():
    torch.manual_seed(0)
    block = GlobalContextBlock(4)
    x = torch.randn(2, 4, 3, 5)
    assert torch.equal(block(x), x), "the zero-initialised last layer makes GC the identity"
    for p in block.parameters():
        nn.init.normal_(p, std=0.5)
    np.testing.assert_allclose(block(x).detach().numpy(), _gc_numpy(block, x), rtol=1e-5, atol=1e-6)


def _fgd_head(**opts):
    cfg = get_distill_cfg()
    cfg.DISTILL.FGD.IN_FEATURES = ["p2"]
    for k, v in opts.items():
        cfg.DISTILL.FGD[k] = v
    return FGD(cfg, _context(_Model(channels=3, strides=(4,)), _Model(channels=3, strides=(4,))))


def _np_attention(x, tau):
    a = np.abs(x)
    b, c, h, w = x.shape
    spatial = h * w * _softmax(a.mean(axis=1).reshape(b, -1) / tau, 1).reshape(b, h, w)
    channel = c * _softmax(a.mean(axis=(2, 3)) / tau, 1)
    return spatial, channel


def test_fgd_losses_golden():
    head = _fgd_head()
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=gen)
    # Image 0: box [4, 4, 12, 8] px -> cells x [1, 3], y [1, 2] (stride 4): 6 cells, 1/6.
    # Image 1: no box -> no foreground, background 1/16 everywhere.
    step = _step([_instances([[4, 4, 12, 8]], (16, 16)), _instances([], (16, 16))], padded=(16, 16))
    out = head(_records({"p2": s}), _records({"p2": t}), step)
    assert set(out) == {"p2_fg", "p2_bg", "p2_at", "p2_glb"}

    fg = np.zeros((2, 4, 4))
    fg[0, 1:3, 1:4] = 1 / 6
    bg = np.zeros((2, 4, 4))
    bg[0] = (fg[0] == 0) / 10
    bg[1] = 1 / 16
    sn, tn = s.detach().numpy(), t.numpy()
    sp_t, ch_t = _np_attention(tn, 0.5)
    sp_s, ch_s = _np_attention(sn, 0.5)
    weighted = (sn - tn) ** 2 * sp_t[:, None] * ch_t[:, :, None, None]
    assert out["p2_fg"].item() == pytest.approx(5e-5 * (weighted * fg[:, None]).sum() / 2, rel=1e-5)
    assert out["p2_bg"].item() == pytest.approx(2.5e-5 * (weighted * bg[:, None]).sum() / 2, rel=1e-5)
    at = (np.abs(ch_t - ch_s).sum() + np.abs(sp_t - sp_s).sum()) / 2
    assert out["p2_at"].item() == pytest.approx(5e-5 * at, rel=1e-5)
    # At initialisation both GcBlocks are the identity: the relation loss is sum (S - T)^2 / B.
    assert out["p2_glb"].item() == pytest.approx(5e-7 * ((sn - tn) ** 2).sum() / 2, rel=1e-5)

    # With trained (non-zero) GcBlocks, each side runs through its own block.
    for block in (head.gc_student["p2"], head.gc_teacher["p2"]):
        for p in block.parameters():
            nn.init.normal_(p, std=0.3)
    out = head(_records({"p2": s}), _records({"p2": t}), step)
    glb = ((_gc_numpy(head.gc_teacher["p2"], t) - _gc_numpy(head.gc_student["p2"], s)) ** 2).sum() / 2
    assert out["p2_glb"].item() == pytest.approx(5e-7 * glb, rel=1e-5)
    sum(out.values()).backward()
    assert s.grad is not None and all(p.grad is not None for p in head.gc_teacher.parameters())


def test_fgd_box_scale_modes():
    # Unpadded image 8 x 16 in a 16 x 16 batch; p2 is 4 x 4. Box [0, 0, 8, 4].
    step = _step([_instances([[0, 0, 8, 4]], (8, 16))], image_sizes=[(8, 16)], padded=(16, 16))
    fg_stride, _ = _fgd_head()._masks("p2", (4, 4), step)
    fg_image, _ = _fgd_head(BOX_SCALE="image_shape")._masks("p2", (4, 4), step)
    # stride: /4 -> [0, 0, 2, 1] -> 3 x 2 cells, 1/6; image_shape: x * 4/16, y * 4/8 -> [0, 0, 2, 2] -> 1/9.
    assert fg_stride[0].sum().item() == pytest.approx(1.0) and fg_stride[0, 0, 0].item() == pytest.approx(1 / 6)
    assert fg_image[0].sum().item() == pytest.approx(1.0) and fg_image[0, 0, 0].item() == pytest.approx(1 / 9)


def test_fgd_config_errors():
    cfg = get_distill_cfg()
    cfg.DISTILL.FGD.IN_FEATURES = ["p2"]
    with pytest.raises(DistillConfigError, match="ADAPTER.ENABLED True"):
        FGD(cfg, _context(_Model(channels=2), _Model(channels=4)))
    cfg.DISTILL.FGD.ADAPTER.ENABLED = True
    head = FGD(cfg, _context(_Model(channels=2), _Model(channels=4)))
    assert head.pairing.adapters["p2"].conv.kernel_size == (1, 1)
    assert head.gc_student["p2"].conv_mask.in_channels == 4
    cfg.DISTILL.FGD.BOX_SCALE = "pixels"
    with pytest.raises(DistillConfigError, match="BOX_SCALE"):
        FGD(cfg, _context(_Model(channels=2), _Model(channels=4)))


# --------------------------------------------------------------------------------------------
# Real models: images without boxes, teacher untouched, 2-iteration BCCD runs

ALL_HEADS = ["fgfi", "defeat", "fgd"]


def test_real_models_images_without_boxes_and_no_teacher_gradient(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(
        "bccd/distill_fgfi_R50_R18.yaml",
        tmp_path,
        teacher_r18_weights,
        opts=["DISTILL.HEADS", ALL_HEADS, "DISTILL.FGFI.WARMUP_ITERS", 0],
    )
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = build_teacher(cfg)
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher.d2kd_cfg))
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
