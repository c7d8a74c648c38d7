"""Golden values of the RetinaNet soft-label head ``densekd`` and the sigmoid KD loss."""

import math

import numpy as np
import pytest
import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from torch import nn

from d2kd import get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import BuildContext, DistillConfigError
from d2kd.heads.dense_kd import DenseKD
from d2kd.heads.dense_outputs import DenseOutputsMixin
from d2kd.losses import binary_kd_div

K = 2  # classes
LEVELS = ["p3", "p4"]
SHAPES = [(2, 2), (1, 1)]  # H, W per level; one anchor per cell


class FakeRetinaNet(nn.Module):
    """What the dense mixin reads of a RetinaNet: levels, anchors, class count."""

    def __init__(self, num_classes=K, sizes=((8,), (16,))):
        super().__init__()
        self.head_in_features = list(LEVELS)
        self.anchor_generator = DefaultAnchorGenerator(
            sizes=[list(s) for s in sizes], aspect_ratios=[[1.0]], strides=[8, 16], offset=0.0
        )
        self.head = nn.Identity()
        self.num_classes = num_classes


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_head(**options):
    cfg = get_distill_cfg()
    for key, value in options.items():
        cfg.DISTILL.DENSEKD[key] = value
    model = FakeRetinaNet()
    return DenseKD(cfg, BuildContext(model, FakeRetinaNet(), cfg, cfg))


def records(logits, labels=None):
    """Records of one model: ``logits`` is a list of (N, A*K, H, W) maps."""
    deltas = [torch.zeros(x.shape[0], 4, *x.shape[-2:]) for x in logits]
    anchors = FakeRetinaNet().anchor_generator([torch.zeros(1, 1, h, w) for h, w in SHAPES])
    data = {"head": [((logits,), (logits, deltas))], "anchor_generator": [((None,), anchors)]}
    if labels is not None:
        boxes = [torch.zeros(len(l), 4) for l in labels]
        data["label_anchors"] = [((anchors, None), (list(labels), boxes))]
    return Records(data)


def example(seed=0):
    rng = np.random.RandomState(seed)
    s = [rng.randn(2, K, h, w).astype(np.float32) * 2 for h, w in SHAPES]
    t = [rng.randn(2, K, h, w).astype(np.float32) * 2 for h, w in SHAPES]
    # 5 anchors per image (4 on p3, 1 on p4): labels -1 ignored, 0..K-1 class, K background.
    labels = [torch.tensor([0, K, -1, K, 1]), torch.tensor([K, K, 1, K, K])]  # 3 positives
    return s, t, labels


def np_binary_terms(zs, zt, temperature, form):
    """Element-wise T^2 * KL / BCE of Bernoulli(sigmoid(zt/T)) vs Bernoulli(sigmoid(zs/T)), in numpy."""
    p, q = np_sigmoid(zs / temperature), np_sigmoid(zt / temperature)
    bce = -(q * np.log(p) + (1 - q) * np.log(1 - p))
    entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    return temperature**2 * (bce - entropy if form == "kl" else bce), p, q


def test_binary_kd_div_hand_computed():
    # z_s = 0 (p = 1/2), z_t = ln 3 (q = 3/4), T = 1.
    zs, zt = torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    bce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))  # = ln 2
    assert binary_kd_div(zs, zt, 1.0, "kl").item() == pytest.approx(kl, abs=1e-6)  # 0.130812
    assert binary_kd_div(zs, zt, 1.0, "bce").item() == pytest.approx(bce, abs=1e-6)
    # A single class: a softmax over classes would give 0; the per-class binary form does not.
    assert binary_kd_div(zs, zt).item() > 0.13
    # Equal logits cost nothing in the KL form; T^2 scaling: T = 2, z_s = 0, z_t = 2 ln 3 -> 4 * kl.
    assert binary_kd_div(zt, zt).abs().item() < 1e-7
    assert binary_kd_div(zs, 2 * zt, 2.0).item() == pytest.approx(4 * kl, abs=1e-5)
    # Gradient in the student: T^2 * d/dz BCE(sigmoid(z/T), q) = T * (p - q).
    z = torch.tensor([[0.0]], requires_grad=True)
    binary_kd_div(z, 2 * zt, 2.0).sum().backward()
    assert z.grad.item() == pytest.approx(2.0 * (0.5 - 0.75), abs=1e-6)


@pytest.mark.parametrize("form,temperature", [("kl", 1.0), ("bce", 1.0), ("kl", 2.0)])
def test_densekd_num_pos_normaliser_golden(form, temperature):
    s, t, labels = example()
    head = make_head(FORM=form, TEMPERATURE=temperature, WEIGHT=0.5)
    out = head(records([torch.from_numpy(x) for x in s], labels), records([torch.from_numpy(x) for x in t]), None)
    assert sorted(out) == LEVELS
    for level, zs, zt in zip(LEVELS, s, t):
        terms, _, _ = np_binary_terms(zs.astype(np.float64), zt.astype(np.float64), temperature, form)
        expected = 0.5 * terms.sum() / 3  # sum over images, anchors, classes / 3 positive anchors
        assert out[level].item() == pytest.approx(expected, rel=1e-5)


def test_densekd_all_anchors_and_focal_weight_golden():
    s, t, labels = example(1)
    head = make_head(NORMALIZER="num_anchors", FOCAL_GAMMA=2.0)
    # label_anchors is not needed (nor captured) when normalising by the anchor count
    assert "label_anchors" not in head.student_methods
    out = head(records([torch.from_numpy(x) for x in s]), records([torch.from_numpy(x) for x in t]), None)
    for level, zs, zt in zip(LEVELS, s, t):
        terms, p, q = np_binary_terms(zs.astype(np.float64), zt.astype(np.float64), 1.0, "kl")
        expected = (terms * np.abs(p - q) ** 2).sum() / (2 * 5)  # 2 images x 5 anchors
        assert out[level].item() == pytest.approx(expected, rel=1e-5)


def test_densekd_no_positive_anchor_and_gradient():
    s, t, _ = example(2)
    no_objects = [torch.full((5,), K), torch.full((5,), K)]  # images without ground truth
    head = make_head()
    s_tensors = [torch.from_numpy(x).requires_grad_() for x in s]
    out = head(records(s_tensors, no_objects), records([torch.from_numpy(x) for x in t]), None)
    total = sum(out.values())
    expected = sum(np_binary_terms(zs.astype(np.float64), zt.astype(np.float64), 1.0, "kl")[0].sum() for zs, zt in zip(s, t))
    assert total.item() == pytest.approx(expected, rel=1e-5)  # normaliser max(1, 0) = 1
    total.backward()
    # d/dz_s = T * (p - q) / Z with T = 1, Z = 1
    np.testing.assert_allclose(s_tensors[0].grad.numpy(), np_sigmoid(s[0]) - np_sigmoid(t[0]), rtol=1e-4, atol=1e-6)


def test_dense_predictions_layout():
    """(N, A*K, H, W) -> (N, H*W*A, K): anchor index (y*W + x)*A + a, channel a*K + k (Detectron2's order)."""
    n, a_count, k_count, h, w = 2, 3, 4, 2, 5
    logits = torch.arange(n * a_count * k_count * h * w, dtype=torch.float32).view(n, a_count * k_count, h, w)
    deltas = torch.zeros(n, a_count * 4, h, w)
    flat, flat_deltas = DenseOutputsMixin.dense_predictions(Records({"head": [((), ([logits], [deltas]))]}), k_count)
    assert flat.shape == (n, h * w * a_count, k_count) and flat_deltas.shape == (n, h * w * a_count, 4)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                for a in range(a_count):
                    for k in range(k_count):
                        assert flat[i, (y * w + x) * a_count + a, k] == logits[i, a * k_count + k, y, x]


def test_densekd_bad_options_and_mismatched_models():
    for key, value, match in [
        ("FORM", "softmax", "FORM"),
        ("NORMALIZER", "images", "NORMALIZER"),
        ("TEMPERATURE", 0.0, "TEMPERATURE"),
        ("FOCAL_GAMMA", -1.0, "FOCAL_GAMMA"),
    ]:
        with pytest.raises(DistillConfigError, match=match):
            make_head(**{key: value})
    cfg = get_distill_cfg()
    with pytest.raises(DistillConfigError, match="3 classes and the teacher 2"):
        DenseKD(cfg, BuildContext(FakeRetinaNet(num_classes=3), FakeRetinaNet(), cfg, cfg))
    with pytest.raises(DistillConfigError, match="anchors differ"):
        DenseKD(cfg, BuildContext(FakeRetinaNet(), FakeRetinaNet(sizes=((8,), (32,))), cfg, cfg))
    cfg.DISTILL.TEACHER.INPUT_SCALE = 2.0
    with pytest.raises(DistillConfigError, match="INPUT_SCALE"):
        DenseKD(cfg, BuildContext(FakeRetinaNet(), FakeRetinaNet(), cfg, cfg))
