"""FGFI (docs/methods/fgfi.md): the imitation mask by hand, head golden values, level assignment, warm-up, errors."""

import numpy as np
import pytest
import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes

from d2kd import get_distill_cfg
from d2kd.heads import DistillConfigError
from d2kd.heads.fgfi import FGFI
from d2kd.heads.fgfi.imitation_mask import imitation_mask
from d2kd.modeling.distiller import head_terms

from conftest import FakeRCNN, backbone_records, fake_rcnn_context, gt_instances, gt_step


# ---------------------------------------------------------------------------------------
# The imitation mask
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------


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
    head = FGFI(_fgfi_cfg(), fake_rcnn_context())
    gen = torch.Generator().manual_seed(0)
    s = {"p2": torch.randn(2, 2, 2, 2, generator=gen), "p3": torch.randn(2, 2, 1, 1, generator=gen)}
    t = {"p2": torch.randn(2, 2, 2, 2, generator=gen), "p3": torch.randn(2, 2, 1, 1, generator=gen)}
    # p3: one cell with a 20x20 anchor (IoU 0.25 with g) and a far one (IoU 0): F = 0.125, cell in.
    anchors = [Boxes(_hand_anchors()), Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 110.0, 110.0]]))]
    step = gt_step([gt_instances([[5, 0, 15, 10]]), gt_instances([])])
    out = head(backbone_records(s, proposal_generator__anchor_generator=anchors), backbone_records(t), step)
    assert set(out) == {"p2", "p3"}
    # Image 0: p2 mask = top row (test above), p3 mask = [[1]]; image 1 has no box: empty masks.
    masks = {"p2": np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]]), "p3": np.array([[[1]], [[0]]])}
    for name, m in masks.items():
        sq = ((s[name].numpy() - t[name].numpy()) ** 2).sum(axis=1)  # (B, H, W), summed over C
        expected = 0.01 * (m * sq).sum() / (2 * m.sum()) / 2  # lambda * L_l / n_levels
        assert out[name].item() == pytest.approx(float(expected), rel=1e-5)


def test_fgfi_assigns_boxes_to_levels_and_warms_up():
    cfg = _fgfi_cfg(ASSIGN_BY_SCALE=True, CANONICAL_BOX_SIZE=16, WARMUP_ITERS=5)
    head = FGFI(cfg, fake_rcnn_context())
    s = {"p2": torch.randn(1, 2, 2, 2), "p3": torch.randn(1, 2, 1, 1)}
    t = {"p2": torch.randn(1, 2, 2, 2), "p3": torch.randn(1, 2, 1, 1)}
    anchors = [Boxes(_hand_anchors()), Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 110.0, 110.0]]))]
    records = backbone_records(s, proposal_generator__anchor_generator=anchors)
    # sqrt(area) 10 with canonical size 16: floor(4 + log2(10/16)) = 3 -> only on p3.
    step = gt_step([gt_instances([[5, 0, 15, 10]])], iteration=5)
    out = head(records, backbone_records(t), step)
    assert out["p2"].item() == 0.0
    sq3 = ((s["p3"] - t["p3"]) ** 2).sum().item()
    assert out["p3"].item() == pytest.approx(0.01 * sq3 / 2 / 2, rel=1e-5)
    # In its own warm-up (iteration 4 < WARMUP_ITERS 5) the distiller gives the head zero terms.
    warm = head_terms(head, records, backbone_records(t), gt_step([gt_instances([[5, 0, 15, 10]])], iteration=4))
    assert all(v.item() == 0.0 for v in warm.values())


def test_fgfi_adapter_and_config_errors():
    torch.manual_seed(0)  # the std of a small random adapter is checked below
    cfg = _fgfi_cfg()
    cfg.DISTILL.FGFI.ADAPTER.ENABLED = True
    head = FGFI(cfg, fake_rcnn_context())
    conv = head.pairing.adapters["p2"].conv
    # FPN features are signed: no ReLU after the adapter unless asked for.
    assert conv.kernel_size == (3, 3) and not head.pairing.adapters["p2"].relu
    cfg.DISTILL.FGFI.ADAPTER.RELU = True
    assert FGFI(cfg, fake_rcnn_context()).pairing.adapters["p2"].relu
    assert conv.weight.std().item() == pytest.approx(1e-4, rel=0.2)
    assert head.student_modules == ["backbone", "proposal_generator.anchor_generator"]
    with pytest.raises(DistillConfigError, match="carry no anchors"):
        FGFI(_fgfi_cfg(), fake_rcnn_context(student=FakeRCNN(anchor_features=("p2",))))
    with pytest.raises(DistillConfigError, match="PSI"):
        FGFI(_fgfi_cfg(PSI=0.0), fake_rcnn_context())
