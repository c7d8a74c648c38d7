"""PKD, Pearson-correlation feature imitation (docs/methods/pkd.md): the loss and the head against numpy."""

import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from d2kd import get_distill_cfg
from d2kd.heads import BuildContext
from d2kd.heads.pkd import PKD, pearson_imitation_loss, standardize_channels
from d2kd.modeling.feature_pairs import FeaturePairing

from conftest import (
    head_step_terms,
    RETINA_STUDENT,
    backbone_records,
    distill_cfg,
    empty_step,
    fake_fpn_context,
    load_test_cfg,
    np64,
    np_conv1x1,
    random_features,
    train,
)


def _pkd_np(s, t, eps=1e-6):
    """Direct formula: per channel over (n, h, w), x -> (x - mean) / (unbiased std + eps); mean square / 2."""
    n, c, h, w = s.shape
    total = 0.0
    for k in range(c):
        a, b = s[:, k].ravel(), t[:, k].ravel()
        a = (a - a.mean()) / (np.std(a, ddof=1) + eps)
        b = (b - b.mean()) / (np.std(b, ddof=1) + eps)
        total += np.sum((a - b) ** 2)
    return total / (n * c * h * w) / 2


def test_pkd_loss_golden_and_pearson_identity():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    assert pearson_imitation_loss(s, t).item() == pytest.approx(_pkd_np(np64(s), np64(t)), rel=1e-5)

    # MSE / 2 of standardised maps = (1 - 1/M) * mean_c (1 - r_c), r_c Pearson's r over M = N*H*W values.
    m = 2 * 4 * 5
    r = [np.corrcoef(np64(s)[:, k].ravel(), np64(t)[:, k].ravel())[0, 1] for k in range(3)]
    expected = (1 - 1 / m) * np.mean(1 - np.array(r))
    assert pearson_imitation_loss(s, t).item() == pytest.approx(expected, rel=1e-4)

    # Invariant to a positive scale and a shift per channel of either side; 0 for equal maps.
    scale = torch.tensor([0.5, 3.0, 40.0])[None, :, None, None]
    shift = torch.tensor([1.0, -2.0, 7.0])[None, :, None, None]
    base = pearson_imitation_loss(s, t).item()
    assert pearson_imitation_loss(s * scale + shift, t).item() == pytest.approx(base, rel=1e-4)
    assert pearson_imitation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # Perfectly anti-correlated: r = -1, the loss is 2 (1 - 1/M).
    assert pearson_imitation_loss(-t, t).item() == pytest.approx(2 * (1 - 1 / m), rel=1e-5)


def test_standardize_channels_uses_the_whole_batch_and_keeps_degenerate_channels_finite():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 2, 3, generator=gen) * 5 + 2
    z = np64(standardize_channels(x))
    for k in range(2):
        assert z[:, k].mean() == pytest.approx(0.0, abs=1e-6)
        assert np.std(z[:, k], ddof=1) == pytest.approx(1.0, rel=1e-5)
    # A constant channel standardises to 0; a single value (N*H*W == 1) too, instead of NaN.
    assert torch.equal(standardize_channels(torch.full((2, 1, 2, 2), 3.0)), torch.zeros(2, 1, 2, 2))
    assert torch.equal(standardize_channels(torch.randn(1, 4, 1, 1)), torch.zeros(1, 4, 1, 1))
    half = standardize_channels(x.half())
    assert half.dtype == torch.float32 and torch.allclose(half, standardize_channels(x.half().float()))
    with pytest.raises(ValueError, match="equal student and teacher shapes"):
        pearson_imitation_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def test_pkd_head_per_level_terms_gradient_and_adapter_only_when_widths_differ():
    gen = torch.Generator().manual_seed(8)
    cfg = get_distill_cfg()
    assert cfg.DISTILL.PKD.WEIGHT == 6.0 and list(cfg.DISTILL.PKD.IN_FEATURES) == []
    cfg.DISTILL.PKD.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.PKD.WEIGHT = 2.5
    head = PKD(cfg, fake_fpn_context(3, 3))
    assert len(list(head.parameters())) == 0  # equal widths: no adapter (the reference has none)
    assert head.teacher_parts == {"backbone"} and head.student_modules == ["backbone"]
    s = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    out = head(backbone_records(s), backbone_records(t), empty_step())
    assert set(out) == {"p2", "p3"}
    for level in out:
        assert out[level].item() == pytest.approx(2.5 * _pkd_np(np64(s[level]), np64(t[level])), rel=1e-5)
    sum(out.values()).backward()
    assert all(v.grad is None for v in t.values()) and all(v.grad is not None for v in s.values())

    head = PKD(cfg, fake_fpn_context(3, 4))  # widths differ: 1x1 conv adapters
    conv = head.pairing.adapters["p2"].conv
    assert conv.kernel_size == (1, 1) and conv.in_channels == 3 and conv.out_channels == 4
    s, t = random_features(gen, 3), random_features(gen, 4)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    adapted = np_conv1x1(np64(s["p2"]), np64(conv.weight), np64(conv.bias))
    assert out["p2"].item() == pytest.approx(2.5 * _pkd_np(adapted, np64(t["p2"])), rel=1e-5)


def test_pkd_resizes_the_student_to_the_teacher_size():
    """A student map of another size is resized bilinearly (align_corners False) to the teacher's."""
    head = PKD(pairing=FeaturePairing(*_fake_models(3), ["p2"], adapter_enabled=False), weight=1.0)
    gen = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    out = head(backbone_records({"p2": s}), backbone_records({"p2": t}), empty_step())
    resized = torch.nn.functional.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    assert out["p2"].item() == pytest.approx(_pkd_np(np64(resized), np64(t)), rel=1e-5)


def _fake_models(channels):
    context = fake_fpn_context(channels, channels)
    return context.student, context.teacher


# ---------------------------------------------------------------------------------------
# Real (tiny) detectors: explicit construction, default levels, two BCCD iterations
# ---------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "config, levels",
    [("bccd/student_R18_FPN.yaml", ["p2", "p3", "p4", "p5"]), (RETINA_STUDENT, ["p3", "p4", "p5", "p6", "p7"])],
    ids=["faster_rcnn", "retinanet"],
)
def test_pkd_explicit_construction_equals_config_and_default_levels(tmp_path, config, levels):
    cfg = load_test_cfg(config, tmp_path)
    torch.manual_seed(0)
    student = build_model(cfg)
    torch.manual_seed(1)
    teacher = build_model(cfg)
    from_cfg = PKD(cfg, BuildContext(student, teacher, cfg, cfg))  # IN_FEATURES empty: the RoI heads' levels
    assert from_cfg.pairing.names == levels
    explicit = PKD(pairing=FeaturePairing(student, teacher, levels, adapter_enabled=False), weight=6.0)
    assert type(explicit) is PKD and explicit.name == from_cfg.name == "pkd"
    for attr in ("student_modules", "student_methods", "teacher_modules", "teacher_methods", "teacher_parts"):
        assert getattr(explicit, attr) == getattr(from_cfg, attr), attr
    explicit.load_state_dict(from_cfg.state_dict())  # strict: neither has parameters
    expected, got = head_step_terms(student, teacher, from_cfg), head_step_terms(student, teacher, explicit)
    assert sorted(expected) == sorted(f"loss_kd_pkd_{l}" for l in levels) == sorted(got)
    for key in expected:
        assert torch.isfinite(expected[key]) and expected[key] > 0, key
        torch.testing.assert_close(got[key], expected[key], msg=key)


def _two_iterations(cfg, keys):
    trainer = train(cfg)
    teacher = trainer.teacher
    histories = trainer.storage.histories()
    for key in keys:
        values = [v for v, _ in histories[key].values()]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (key, values)
    assert sorted(k for k in histories if k.startswith("loss_kd_")) == sorted(keys)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    return trainer


@pytest.mark.train
def test_pkd_two_bccd_iterations_faster_rcnn(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_pkd_R50_R18.yaml", tmp_path, teacher_r18_weights)
    assert cfg.DISTILL.HEADS == ["pkd"] and cfg.DISTILL.PKD.WEIGHT == 6.0
    _two_iterations(cfg, [f"loss_kd_pkd_p{i}" for i in range(2, 6)])


@pytest.mark.train
def test_pkd_two_bccd_iterations_retinanet(tmp_path, retina_r18_weights):
    cfg = distill_cfg(
        "bccd/distill_pkd_retinanet_R50_R18.yaml", tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT
    )
    assert cfg.DISTILL.PKD.WEIGHT == 10.0
    _two_iterations(cfg, [f"loss_kd_pkd_p{i}" for i in range(3, 7)])


def test_pkd_coco_preset_uses_the_reference_defaults():
    import os

    from d2kd.config import merge_config

    from conftest import CONFIGS

    cfg = get_distill_cfg()
    merge_config(cfg, os.path.join(CONFIGS, "coco", "distill_pkd_R101_R50.yaml"))
    assert cfg.DISTILL.HEADS == ["pkd"] and cfg.DISTILL.PKD.WEIGHT == 6.0
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
