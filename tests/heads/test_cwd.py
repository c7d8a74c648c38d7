"""CWD, channel-wise distillation (docs/methods/cwd.md): the divergence and the head against numpy."""

import math

import numpy as np
import pytest
import torch

from d2kd import get_distill_cfg
from d2kd.heads import DistillConfigError
from d2kd.heads.cwd import CWD, channel_wise_divergence

from conftest import backbone_records, empty_step, fake_fpn_context, np64, np_conv1x1, np_softmax_1d, random_features


def _cwd_np(s, t, tau):
    n, c = s.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(c):
            p_t = np_softmax_1d(t[i, j].ravel() / tau)
            p_s = np_softmax_1d(s[i, j].ravel() / tau)
            total += np.sum(p_t * (np.log(p_t) - np.log(p_s)))
    return tau**2 * total / (n * c)


def test_cwd_loss_hand_value_and_golden():
    # One 1x2 channel map, tau 1: teacher [log 3, 0] -> (3/4, 1/4); student uniform (1/2, 1/2).
    t = torch.tensor([[[[math.log(3.0), 0.0]]]])
    s = torch.zeros(1, 1, 1, 2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert channel_wise_divergence(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    gen = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 3, 3, 4, generator=gen), torch.randn(2, 3, 3, 4, generator=gen)
    for tau in (1.0, 2.5):
        assert channel_wise_divergence(s, t, tau).item() == pytest.approx(_cwd_np(np64(s), np64(t), tau), rel=1e-5)


def test_cwd_head_per_level_terms_and_adapter_only_when_widths_differ():
    gen = torch.Generator().manual_seed(8)
    cfg = get_distill_cfg()
    cfg.DISTILL.CWD.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.CWD.TAU = 2.0
    head = CWD(cfg, fake_fpn_context(3, 3))
    assert len(list(head.parameters())) == 0  # equal widths: no adapter (mmrazor)
    s = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    out = head(backbone_records(s), backbone_records(t), empty_step())
    assert set(out) == {"p2", "p3"}
    for level in out:
        assert out[level].item() == pytest.approx(10.0 * _cwd_np(np64(s[level]), np64(t[level]), 2.0), rel=1e-5)
    sum(out.values()).backward()
    assert all(v.grad is None for v in t.values()) and all(v.grad is not None for v in s.values())

    head = CWD(cfg, fake_fpn_context(3, 4))  # widths differ: 1x1 conv adapters
    conv = head.pairing.adapters["p2"].conv
    assert conv.kernel_size == (1, 1) and conv.in_channels == 3 and conv.out_channels == 4
    s, t = random_features(gen, 3), random_features(gen, 4)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    adapted = np_conv1x1(np64(s["p2"]), np64(conv.weight), np64(conv.bias))
    assert out["p2"].item() == pytest.approx(10.0 * _cwd_np(adapted, np64(t["p2"]), 2.0), rel=1e-5)

    cfg.DISTILL.CWD.TAU = 0.0
    with pytest.raises(DistillConfigError, match="TAU must be > 0"):
        CWD(cfg, fake_fpn_context(3, 3))
