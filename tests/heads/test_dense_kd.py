"""The RetinaNet soft-label head densekd (docs/methods/dense_kd.md): golden values, build errors, RetinaNet runs."""

import numpy as np
import pytest
import torch
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from torch import nn

from d2kd import DistillTrainer, get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import BuildContext, DistillConfigError
from d2kd.heads.dense_kd import DenseKD

from conftest import RETINA_LEVELS, RETINA_STUDENT, assert_logged_and_finite, distill_cfg, load_test_cfg, train


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


# ---------------------------------------------------------------------------------------
# RetinaNet detectors end to end
# ---------------------------------------------------------------------------------------


@pytest.mark.train
def test_retinanet_distillation_fitnet_p3_p7_and_densekd(tmp_path, retina_r18_weights):
    """2 iterations of RetinaNet -> RetinaNet: fitnet on p3..p7 and the sigmoid soft labels."""
    cfg = distill_cfg(
        "bccd/distill_densekd_retinanet_R50_R18.yaml",
        tmp_path,
        retina_r18_weights,
        teacher_config=RETINA_STUDENT,
        opts=["DISTILL.HEADS", ["densekd", "fitnet"], "DISTILL.FITNET.IN_FEATURES", RETINA_LEVELS],
    )
    trainer = train(cfg)
    keys = ["loss_cls", "loss_box_reg"] + [f"loss_kd_{h}_{l}" for h in ("fitnet", "densekd") for l in RETINA_LEVELS]
    losses = assert_logged_and_finite(trainer, keys)
    assert all(losses[f"loss_kd_densekd_{l}"] >= 0 for l in RETINA_LEVELS)
    assert sorted(trainer.model.teacher_runner.parts) == ["backbone", "dense"]
    # The config used by the repository for the fitnet-only RetinaNet run names p3..p7 too.
    fitnet_cfg = load_test_cfg("bccd/distill_fitnet_retinanet_R50_R18.yaml", tmp_path / "f")
    assert list(fitnet_cfg.DISTILL.FITNET.IN_FEATURES) == RETINA_LEVELS


def test_densekd_needs_two_retinanets(tmp_path, retina_r18_weights, teacher_r18_weights):
    # RetinaNet student, Faster R-CNN teacher (and the reverse): a clear error while building.
    for config, weights, teacher_config, role in (
        ("bccd/distill_densekd_retinanet_R50_R18.yaml", teacher_r18_weights, "bccd/student_R18_FPN.yaml", "teacher"),
        ("bccd/distill_kd_R50_R18.yaml", retina_r18_weights, RETINA_STUDENT, "student"),
    ):
        cfg = distill_cfg(config, tmp_path / role, weights, teacher_config=teacher_config, opts=["DISTILL.HEADS", ["densekd"]])
        with pytest.raises(DistillConfigError, match=f"the {role} .* has none"):
            DistillTrainer(cfg)
