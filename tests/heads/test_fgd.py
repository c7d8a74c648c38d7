"""FGD (docs/methods/fgd.md): focal masks, the GcBlock and the four terms against numpy, box scales, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from d2kd import get_distill_cfg
from d2kd.heads import DistillConfigError
from d2kd.heads.fgd import FGD, fgd_masks
from d2kd.heads.fgd.gc_block import GlobalContextBlock

from conftest import FakeRCNN, backbone_records, fake_rcnn_context, gt_instances, gt_step, np_softmax


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
        attn = np_softmax(wk @ flat + bk, 0)
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
    return FGD(cfg, fake_rcnn_context(FakeRCNN(channels=3, strides=(4,)), FakeRCNN(channels=3, strides=(4,))))


def _np_attention(x, tau):
    a = np.abs(x)
    b, c, h, w = x.shape
    spatial = h * w * np_softmax(a.mean(axis=1).reshape(b, -1) / tau, 1).reshape(b, h, w)
    channel = c * np_softmax(a.mean(axis=(2, 3)) / tau, 1)
    return spatial, channel


def test_fgd_losses_golden():
    head = _fgd_head()
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, generator=gen)
    # Image 0: box [4, 4, 12, 8] px -> cells x [1, 3], y [1, 2] (stride 4): 6 cells, 1/6.
    # Image 1: no box -> no foreground, background 1/16 everywhere.
    step = gt_step([gt_instances([[4, 4, 12, 8]], (16, 16)), gt_instances([], (16, 16))], padded=(16, 16))
    out = head(backbone_records({"p2": s}), backbone_records({"p2": t}), step)
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
    out = head(backbone_records({"p2": s}), backbone_records({"p2": t}), step)
    glb = ((_gc_numpy(head.gc_teacher["p2"], t) - _gc_numpy(head.gc_student["p2"], s)) ** 2).sum() / 2
    assert out["p2_glb"].item() == pytest.approx(5e-7 * glb, rel=1e-5)
    sum(out.values()).backward()
    assert s.grad is not None and all(p.grad is not None for p in head.gc_teacher.parameters())


def test_fgd_box_scale_modes():
    # Unpadded image 8 x 16 in a 16 x 16 batch; p2 is 4 x 4. Box [0, 0, 8, 4].
    step = gt_step([gt_instances([[0, 0, 8, 4]], (8, 16))], image_sizes=[(8, 16)], padded=(16, 16))
    fg_stride, _ = _fgd_head()._masks("p2", (4, 4), step)
    fg_image, _ = _fgd_head(BOX_SCALE="image_shape")._masks("p2", (4, 4), step)
    # stride: /4 -> [0, 0, 2, 1] -> 3 x 2 cells, 1/6; image_shape: x * 4/16, y * 4/8 -> [0, 0, 2, 2] -> 1/9.
    assert fg_stride[0].sum().item() == pytest.approx(1.0) and fg_stride[0, 0, 0].item() == pytest.approx(1 / 6)
    assert fg_image[0].sum().item() == pytest.approx(1.0) and fg_image[0, 0, 0].item() == pytest.approx(1 / 9)


def test_fgd_config_errors():
    cfg = get_distill_cfg()
    cfg.DISTILL.FGD.IN_FEATURES = ["p2"]
    with pytest.raises(DistillConfigError, match="ADAPTER.ENABLED True"):
        FGD(cfg, fake_rcnn_context(FakeRCNN(channels=2), FakeRCNN(channels=4)))
    cfg.DISTILL.FGD.ADAPTER.ENABLED = True
    head = FGD(cfg, fake_rcnn_context(FakeRCNN(channels=2), FakeRCNN(channels=4)))
    assert head.pairing.adapters["p2"].conv.kernel_size == (1, 1)
    assert head.gc_student["p2"].conv_mask.in_channels == 4
    cfg.DISTILL.FGD.BOX_SCALE = "pixels"
    with pytest.raises(DistillConfigError, match="BOX_SCALE"):
        FGD(cfg, fake_rcnn_context(FakeRCNN(channels=2), FakeRCNN(channels=4)))
