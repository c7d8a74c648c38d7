"""Golden values of the first two heads: FitNets hints and Hinton KD (docs/methods/kd.md)."""

import numpy as np
import pytest
import torch
from torch import nn

from d2kd.capture import Records
from d2kd.heads.fitnet import FitNet
from d2kd.heads.kd import KD
from d2kd.losses import feature_mse, kd_kl_div
from d2kd import get_distill_cfg
from conftest import fake_fpn_context


def test_kd_kl_div_matches_hand_formula():
    zs = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    zt = np.array([[2.0, 0.0, 1.0, -2.0], [1.0, -1.0, 2.0, 0.5]])
    T = 2.0

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(zs / T), softmax(zt / T)
    expected = T * T * np.mean(np.sum(q * (np.log(q) - np.log(p)), axis=1))
    got = kd_kl_div(torch.tensor(zs), torch.tensor(zt), T)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # Hand value for one row, T=1, uniform student: KL(q||u) = sum q log q + log K.
    q1 = softmax(np.array([[2.0, 0.0]]))[0]
    expected_row = float(np.sum(q1 * np.log(q1)) + np.log(2))
    assert kd_kl_div(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), 1.0).item() == pytest.approx(expected_row)


def test_kd_kl_div_zero_when_equal_and_grad_only_to_student():
    zs = torch.randn(5, 4, requires_grad=True)
    zt = zs.detach().clone().requires_grad_(True)
    loss = kd_kl_div(zs, zt, 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    kd_kl_div(zs, zt + torch.randn(5, 4), 3.0).backward()
    assert zs.grad is not None and zt.grad is None


def test_kd_kl_div_empty_rois_is_zero_with_graph():
    zs = torch.zeros(0, 4, requires_grad=True)
    loss = kd_kl_div(zs, torch.zeros(0, 4))
    assert loss.item() == 0.0 and loss.requires_grad


def test_feature_mse_hand_value():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
    assert feature_mse(s, t).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_mse(s, t[..., :1])






def test_fitnet_head_per_level_terms_golden():
    cfg = get_distill_cfg()
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.FITNET.WEIGHT = 0.5
    head = FitNet(cfg, fake_fpn_context(2, 3))
    # Make the 1x1 adapter a known linear map: out = W x + b.
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 1.0, -1.0])
    for adapter in head.pairing.adapters.values():
        adapter.conv.weight.data = W[:, :, None, None].clone()
        adapter.conv.bias.data = b.clone()
    gen = torch.Generator().manual_seed(0)
    s = {k: torch.randn(1, 2, n, n, generator=gen) for k, n in (("p2", 4), ("p3", 2))}
    t = {k: torch.randn(1, 3, n, n, generator=gen) for k, n in (("p2", 4), ("p3", 2))}
    out = head(Records({"backbone": [((), s)]}), Records({"backbone": [((), t)]}), None)
    assert set(out) == {"p2", "p3"}
    for k in ("p2", "p3"):
        sn, tn = s[k][0].numpy(), t[k][0].numpy()
        adapted = np.einsum("oc,chw->ohw", W.numpy(), sn) + b.numpy()[:, None, None]
        expected = 0.5 * np.mean((adapted - tn) ** 2)
        assert out[k].item() == pytest.approx(float(expected), rel=1e-5)


def test_fitnet_without_adapter_needs_equal_channels():
    cfg = get_distill_cfg()
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2"]
    cfg.DISTILL.FITNET.ADAPTER.ENABLED = False
    with pytest.raises(ValueError, match="adapter is disabled.*2 channels.*3"):
        FitNet(cfg, fake_fpn_context(2, 3))
    head = FitNet(cfg, fake_fpn_context(3, 3))
    s = torch.ones(1, 3, 2, 2)
    t = torch.zeros(1, 3, 2, 2)
    out = head(Records({"backbone": [((), {"p2": s})]}), Records({"backbone": [((), {"p2": t})]}), None)
    assert out["p2"].item() == pytest.approx(1.0)


class _RoIModel(nn.Module):
    """A stand-in two-stage detector: ``roi_heads`` with ``num_classes`` and a box predictor,
    whose class-score layer (``cls_in`` features in) exists only when asked for."""

    def __init__(self, k, cls_in=None):
        super().__init__()
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = nn.Module()
        if cls_in is not None:
            self.roi_heads.box_predictor.cls_score = nn.Linear(cls_in, k + 1)
        self.roi_heads.num_classes = k


def test_kd_head_uses_roi_scores_of_both_models():
    from d2kd.heads import BuildContext, DistillConfigError

    cfg = get_distill_cfg()
    cfg.DISTILL.KD.TEMPERATURE = 2.0
    cfg.DISTILL.KD.WEIGHT = 3.0
    head = KD(cfg, BuildContext(_RoIModel(3), _RoIModel(3), None, None))
    assert head.teacher_parts == {"roi_box"}
    zs = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    zt = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    out = head(
        Records({"roi_heads.box_predictor": [((), (zs, None))]}), Records({"roi_heads.box_predictor": [((), (zt, None))]}), None
    )
    p = np.exp(zs.numpy()[0] / 2) / np.exp(zs.numpy()[0] / 2).sum()
    q = np.exp(zt.numpy()[0] / 2) / np.exp(zt.numpy()[0] / 2).sum()
    assert out[""].item() == pytest.approx(3.0 * 4.0 * float(np.sum(q * np.log(q / p))), rel=1e-5)
    with pytest.raises(DistillConfigError, match="3 classes.*teacher 5"):
        KD(cfg, BuildContext(_RoIModel(3), _RoIModel(5), None, None))


def test_kd_classifier_only_trains_only_the_class_score_layer():
    """DISTILL.KD.CLASSIFIER_ONLY: the student's logits are recomputed from its detached box
    features, so the KD gradient reaches cls_score (dL/dW = g^T x with
    g = WEIGHT * T * (p - q) / R) and nothing before it; the head owns no parameter."""
    from d2kd.heads import BuildContext, DistillConfigError

    torch.manual_seed(0)
    cfg = get_distill_cfg()
    cfg.DISTILL.KD.TEMPERATURE = 2.0
    cfg.DISTILL.KD.WEIGHT = 3.0
    cfg.DISTILL.KD.CLASSIFIER_ONLY = True
    student = _RoIModel(2, cls_in=5)
    head = KD(cfg, BuildContext(student, _RoIModel(2), None, None))
    assert len(head.state_dict()) == 0 and len(list(head.parameters())) == 0

    shared_fc = nn.Linear(4, 5)  # stands for the box head's FC layers
    box_features = shared_fc(torch.randn(2, 4))
    zs = student.roi_heads.box_predictor.cls_score(box_features)
    zt = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]])
    out = head(
        Records({"roi_heads.box_predictor": [((box_features,), (zs, None))]}),
        Records({"roi_heads.box_predictor": [((), (zt, None))]}),
        None,
    )[""]
    z, t, x = zs.detach().numpy(), zt.numpy(), box_features.detach().numpy()
    p = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    q = np.exp(t / 2) / np.exp(t / 2).sum(1, keepdims=True)
    assert out.item() == pytest.approx(3.0 * 4.0 * float(np.sum(q * np.log(q / p))) / 2, rel=1e-5)
    out.backward()
    assert shared_fc.weight.grad is None and shared_fc.bias.grad is None
    g = 3.0 * 2.0 * (p - q) / 2
    np.testing.assert_allclose(student.roi_heads.box_predictor.cls_score.weight.grad.numpy(), g.T @ x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(student.roi_heads.box_predictor.cls_score.bias.grad.numpy(), g.sum(0), rtol=1e-4, atol=1e-6)

    with pytest.raises(DistillConfigError, match="cls_score linear layer.*CLASSIFIER_ONLY False"):
        KD(cfg, BuildContext(_RoIModel(2), _RoIModel(2), None, None))
