"""MGD, masked generative distillation (docs/methods/mgd.md): mask, generator and head against numpy."""

import math
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from d2kd import get_distill_cfg
from d2kd.heads import BuildContext, DistillConfigError
from d2kd.heads.mgd import MGD, MGDGenerator, generation_distance, random_spatial_mask
from d2kd.modeling.feature_pairs import FeaturePairing

from conftest import (
    head_step_terms,
    CONFIGS,
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


def np_conv3x3(x, w, b):
    """A 3x3 convolution (cross-correlation, zero padding 1) of (N, C, H, W) ``x`` with torch's (O, C, 3, 3) weight."""
    n, c, h, wd = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("oc,nchw->nohw", w[:, :, dy, dx], padded[:, :, dy : dy + h, dx : dx + wd])
    return out + b[None, :, None, None]


def np_generate(generator, x):
    """G(x) = conv3x3(relu(conv3x3(x))) with the block's weights, in numpy."""
    first, last = generator[0], generator[2]
    hidden = np.maximum(np_conv3x3(x, np64(first.weight), np64(first.bias)), 0.0)
    return np_conv3x3(hidden, np64(last.weight), np64(last.bias))


def np_mask(draws, ratio):
    """The reference's rule on uniform draws: 0 where r > 1 - ratio, else 1."""
    return np.where(draws > 1 - ratio, 0.0, 1.0)


def _mgd_np(s, t, mask, generator, alpha):
    """alpha * sum (T - G(S * M))^2 / N by direct formula."""
    generated = np_generate(generator, s * mask)
    return alpha * np.sum((t - generated) ** 2) / s.shape[0]


def test_random_spatial_mask_rule_reproducibility_device_and_dtype():
    draws = torch.rand((2, 1, 5, 6), generator=torch.Generator().manual_seed(11))
    mask = random_spatial_mask(2, 5, 6, 0.65, generator=torch.Generator().manual_seed(11))
    assert mask.shape == (2, 1, 5, 6) and mask.dtype == torch.float32
    np.testing.assert_array_equal(mask.numpy(), np_mask(draws.numpy(), 0.65))
    # The global generator: torch.manual_seed makes it reproducible; the dtype follows the request.
    torch.manual_seed(5)
    a = random_spatial_mask(3, 4, 4, 0.45, dtype=torch.float16, device=torch.device("cpu"))
    torch.manual_seed(5)
    b = random_spatial_mask(3, 4, 4, 0.45, dtype=torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a, b)
    # About a fraction lambda of the positions is masked; 0 and 1 are the extremes.
    big = random_spatial_mask(4, 100, 100, 0.65, generator=torch.Generator().manual_seed(0))
    assert 1 - big.mean().item() == pytest.approx(0.65, abs=0.01)
    assert torch.equal(random_spatial_mask(1, 3, 3, 0.0), torch.ones(1, 1, 3, 3))
    assert torch.equal(random_spatial_mask(1, 3, 3, 1.0), torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        random_spatial_mask(1, 3, 3, 1.5)


def test_generation_distance_and_generator_golden():
    gen = torch.Generator().manual_seed(2)
    g, t = torch.randn(3, 2, 4, 5, generator=gen), torch.randn(3, 2, 4, 5, generator=gen)
    assert generation_distance(g, t).item() == pytest.approx(np.sum((np64(g) - np64(t)) ** 2) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="equal generated and teacher shapes"):
        generation_distance(g, t[:, :1])
    torch.manual_seed(0)
    block = MGDGenerator(2)
    assert [type(m).__name__ for m in block] == ["Conv2d", "ReLU", "Conv2d"]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for m in (block[0], block[2]))
    np.testing.assert_allclose(np64(block(g)), np_generate(block, np64(g)), rtol=1e-5, atol=1e-6)


def _draws(shapes, seed):
    """The uniform draws the head makes after ``torch.manual_seed(seed)``: one (N, 1, H, W) per level, in order."""
    torch.manual_seed(seed)
    return [torch.rand((n, 1, h, w)).numpy() for n, h, w in shapes]


def test_mgd_head_golden_per_level_with_a_seeded_mask_and_gradients():
    gen = torch.Generator().manual_seed(8)
    cfg = get_distill_cfg()
    assert (cfg.DISTILL.MGD.ALPHA, cfg.DISTILL.MGD.LAMBDA) == (5e-7, 0.45)
    cfg.DISTILL.MGD.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.MGD.ALPHA = 0.25
    cfg.DISTILL.MGD.LAMBDA = 0.5
    torch.manual_seed(0)
    head = MGD(cfg, fake_fpn_context(3, 3))
    assert not any(a.conv is not None for a in head.pairing.adapters.values())  # equal widths: no align conv
    assert sorted(head.generators) == ["p2", "p3"] and head.generators["p2"][0].in_channels == 3
    s = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}
    t = {k: v.requires_grad_(True) for k, v in random_features(gen, 3).items()}

    torch.manual_seed(21)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    draws = _draws([(2, 4, 4), (2, 2, 2)], 21)
    assert set(out) == {"p2", "p3"}
    for level, r in zip(("p2", "p3"), draws):
        expected = _mgd_np(np64(s[level]), np64(t[level]), np_mask(r, 0.5), head.generators[level], 0.25)
        assert out[level].item() == pytest.approx(expected, rel=1e-5)
    # The same seed, the same masks; masking changes the value (lambda 0.5 on 16 positions).
    torch.manual_seed(21)
    again = head(backbone_records(s), backbone_records(t), empty_step())
    assert all(again[k].item() == out[k].item() for k in out)
    unmasked = _mgd_np(np64(s["p2"]), np64(t["p2"]), 1.0, head.generators["p2"], 0.25)
    assert out["p2"].item() != pytest.approx(unmasked, rel=1e-3)

    sum(out.values()).backward()
    assert all(v.grad is None for v in t.values()) and all(v.grad is not None for v in s.values())
    assert all(p.grad is not None for p in head.generators.parameters())  # the generators train


def test_mgd_head_aligns_before_masking_when_widths_differ():
    gen = torch.Generator().manual_seed(9)
    cfg = get_distill_cfg()
    cfg.DISTILL.MGD.IN_FEATURES = ["p2"]
    cfg.DISTILL.MGD.ALPHA = 2e-5
    cfg.DISTILL.MGD.LAMBDA = 0.65
    torch.manual_seed(0)
    head = MGD(cfg, fake_fpn_context(3, 4))
    conv = head.pairing.adapters["p2"].conv
    assert conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (3, 4)
    assert head.generators["p2"][0].in_channels == 4 and head.generators["p2"][2].out_channels == 4
    s, t = random_features(gen, 3, sizes=(("p2", 4),)), random_features(gen, 4, sizes=(("p2", 4),))
    torch.manual_seed(22)
    out = head(backbone_records(s), backbone_records(t), empty_step())
    (r,) = _draws([(2, 4, 4)], 22)
    aligned = np_conv1x1(np64(s["p2"]), np64(conv.weight), np64(conv.bias))
    expected = _mgd_np(aligned, np64(t["p2"]), np_mask(r, 0.65), head.generators["p2"], 2e-5)
    assert out["p2"].item() == pytest.approx(expected, rel=1e-5)


def test_mgd_mask_follows_the_feature_dtype_and_bad_lambda_is_rejected():
    cfg = get_distill_cfg()
    cfg.DISTILL.MGD.IN_FEATURES = ["p2"]
    head = MGD(cfg, fake_fpn_context(2, 2))
    mask = head.mask(torch.zeros(3, 2, 5, 7, dtype=torch.float64))
    assert mask.shape == (3, 1, 5, 7) and mask.dtype == torch.float64
    for bad in (-0.1, 1.2):
        cfg.DISTILL.MGD.LAMBDA = bad
        with pytest.raises(DistillConfigError, match="LAMBDA"):
            MGD(cfg, fake_fpn_context(2, 2))


# ---------------------------------------------------------------------------------------
# Real (tiny) detectors: explicit construction, default levels, two BCCD iterations
# ---------------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "config, levels",
    [("bccd/student_R18_FPN.yaml", ["p2", "p3", "p4", "p5"]), (RETINA_STUDENT, ["p3", "p4", "p5", "p6", "p7"])],
    ids=["faster_rcnn", "retinanet"],
)
def test_mgd_explicit_construction_equals_config_and_default_levels(tmp_path, config, levels):
    cfg = load_test_cfg(config, tmp_path)
    torch.manual_seed(0)
    student = build_model(cfg)
    torch.manual_seed(1)
    teacher = build_model(cfg)
    torch.manual_seed(7)
    from_cfg = MGD(cfg, BuildContext(student, teacher, cfg, cfg))  # IN_FEATURES empty: the RoI heads' levels
    assert from_cfg.pairing.names == levels
    torch.manual_seed(7)
    explicit = MGD(pairing=FeaturePairing(student, teacher, levels, adapter_enabled=False), alpha=5e-7, lam=0.45)
    assert type(explicit) is MGD and explicit.name == from_cfg.name == "mgd"
    for attr in ("student_modules", "student_methods", "teacher_modules", "teacher_methods", "teacher_parts"):
        assert getattr(explicit, attr) == getattr(from_cfg, attr), attr
    explicit.load_state_dict(from_cfg.state_dict())  # strict: the same generator parameters
    expected, got = head_step_terms(student, teacher, from_cfg), head_step_terms(student, teacher, explicit)
    assert sorted(expected) == sorted(f"loss_kd_mgd_{l}" for l in levels) == sorted(got)
    for key in expected:
        assert torch.isfinite(expected[key]) and expected[key] > 0, key
        torch.testing.assert_close(got[key], expected[key], msg=key)


def _two_iterations(cfg, keys):
    trainer = train(cfg)
    histories = trainer.storage.histories()
    for key in keys:
        values = [v for v, _ in histories[key].values()]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (key, values)
    assert sorted(k for k in histories if k.startswith("loss_kd_")) == sorted(keys)
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    # The generation blocks are optimised with the student.
    generators = trainer.heads["mgd"].generators
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in generators.parameters()} <= optimised
    return trainer


@pytest.mark.train
def test_mgd_two_bccd_iterations_faster_rcnn(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_mgd_R50_R18.yaml", tmp_path, teacher_r18_weights)
    assert (cfg.DISTILL.MGD.ALPHA, cfg.DISTILL.MGD.LAMBDA) == (5e-7, 0.45)
    _two_iterations(cfg, [f"loss_kd_mgd_p{i}" for i in range(2, 6)])


@pytest.mark.train
def test_mgd_two_bccd_iterations_retinanet(tmp_path, retina_r18_weights):
    cfg = distill_cfg(
        "bccd/distill_mgd_retinanet_R50_R18.yaml", tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT
    )
    assert (cfg.DISTILL.MGD.ALPHA, cfg.DISTILL.MGD.LAMBDA) == (2e-5, 0.65)
    _two_iterations(cfg, [f"loss_kd_mgd_p{i}" for i in range(3, 8)])


def test_mgd_coco_preset_uses_the_two_stage_defaults():
    from d2kd.config import merge_config

    cfg = get_distill_cfg()
    merge_config(cfg, os.path.join(CONFIGS, "coco", "distill_mgd_R101_R50.yaml"))
    assert cfg.DISTILL.HEADS == ["mgd"] and (cfg.DISTILL.MGD.ALPHA, cfg.DISTILL.MGD.LAMBDA) == (5e-7, 0.45)
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
