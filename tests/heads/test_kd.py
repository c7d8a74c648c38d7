"""Hinton KD on the RoI class scores (docs/methods/kd.md): golden values, class checks, CLASSIFIER_ONLY."""

import numpy as np
import pytest
import torch
from torch import nn

from d2kd.capture import Records
from d2kd.heads.kd import KD
from d2kd import get_distill_cfg


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
