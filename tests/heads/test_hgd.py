"""HGD-like all-stage distillation (docs/methods/hgd.md): correspondence, micro and macro re-weightings, a BCCD run."""

import glob
import math
import os

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from torch import nn

from d2kd.config import merge_config
from d2kd import get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import BuildContext, DistillConfigError, StepInputs
from d2kd.heads.hgd import HGD
from d2kd.heads.hgd.spatial_weights import spatial_weight_map
from d2kd.heads.hgd.stage_weights import StageWeighting

from conftest import CONFIGS, distill_cfg, np_imitation_loss


STAGES = ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]


# ---------------------------------------------------------------------------------------------
# Fake models: only the shapes a head reads at build time.


class _Shapes(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes

    def output_shape(self):
        return dict(self.shapes)


class _FakeBackbone(_Shapes):
    def __init__(self, fpn, bottom_up):
        super().__init__(fpn)
        if bottom_up is not None:
            self.bottom_up = _Shapes(bottom_up)


class _FakeModel(nn.Module):
    def __init__(self, fpn, bottom_up):
        super().__init__()
        self.backbone = _FakeBackbone(fpn, bottom_up)


def fake_resnet_fpn(
    res_channels=(64, 128, 256, 512), fpn_channels=128, res_levels=(2, 3, 4, 5), res5_stride=None, fpn_levels=None
):
    bottom_up = {f"res{l}": ShapeSpec(channels=c, stride=2**l) for l, c in zip(res_levels, res_channels)}
    if res5_stride is not None:
        bottom_up["res5"] = ShapeSpec(channels=bottom_up["res5"].channels, stride=res5_stride)
    fpn_levels = fpn_levels or list(res_levels) + [max(res_levels) + 1]
    fpn = {f"p{l}": ShapeSpec(channels=fpn_channels, stride=2**l) for l in fpn_levels}
    return _FakeModel(fpn, bottom_up)


R18 = dict(res_channels=(64, 128, 256, 512), fpn_channels=128)
R50 = dict(res_channels=(256, 512, 1024, 2048), fpn_channels=128)


def hgd_cfg(opts=(), input_scale=1.0):
    cfg = get_distill_cfg()
    cfg.merge_from_list(list(opts))
    cfg.DISTILL.TEACHER.INPUT_SCALE = input_scale
    return cfg


def build_head(student, teacher, opts=(), input_scale=1.0):
    cfg = hgd_cfg(opts, input_scale)
    return HGD(cfg, BuildContext(student, teacher, cfg, None))


def records(features):
    """Records as the Recorder gives them: res* from backbone.bottom_up, p* from backbone."""
    res = {k: v for k, v in features.items() if k.startswith("res")}
    pyr = {k: v for k, v in features.items() if k.startswith("p")}
    data = {}
    if res:
        data["backbone.bottom_up"] = [((), res)]
    if pyr:
        data["backbone"] = [((), pyr)]
    return Records(data)


def instances(boxes, hw=(64, 64)):
    inst = Instances(hw)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return inst


def step_inputs(gt):
    return StepInputs(batched_inputs=[], gt_instances=gt, student_images=None, teacher_images=None, iteration=0)


def adapter_shape(head, stage):
    conv = head.pairing.adapters[stage].conv
    return (conv.in_channels, conv.out_channels)


# ---------------------------------------------------------------------------------------------
# Correspondence


def test_correspondence_equal_architectures_pairs_by_name():
    head = build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R18))
    assert head.teacher_stages == {s: s for s in STAGES}
    assert adapter_shape(head, "res2") == (64, 64) and adapter_shape(head, "p6") == (128, 128)
    assert head.student_modules == ["backbone", "backbone.bottom_up"]
    assert head.teacher_modules == ["backbone", "backbone.bottom_up"]
    assert head.teacher_strides["res2"] == 4 and head.teacher_strides["p6"] == 64


def test_correspondence_unequal_channels_r18_to_r50():
    head = build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50))
    assert head.teacher_stages == {s: s for s in STAGES}
    assert [adapter_shape(head, s) for s in ["res2", "res3", "res4", "res5"]] == [
        (64, 256),
        (128, 512),
        (256, 1024),
        (512, 2048),
    ]
    assert all(adapter_shape(head, f"p{l}") == (128, 128) for l in range(2, 7))
    # The adapted student has the teacher's channels.
    s = {"res2": torch.randn(1, 64, 8, 8)}
    t = {"res2": torch.randn(1, 256, 8, 8)}
    head = build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50), ["DISTILL.HGD.IN_FEATURES", ["res2"]])
    ((_, adapted, target, _),) = head.pairing.pairs(records(s), records(t))
    assert adapted.shape == target.shape == (1, 256, 8, 8)
    # Without adapters, unequal widths cannot be paired: a build-time error naming the option.
    with pytest.raises(DistillConfigError, match="res2.*ADAPTER.ENABLED"):
        build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50), ["DISTILL.HGD.ADAPTER.ENABLED", False])


def test_correspondence_unequal_depth_teacher_without_stride4_stages():
    teacher = fake_resnet_fpn(res_channels=(512, 1024, 2048), res_levels=(3, 4, 5), fpn_levels=[3, 4, 5, 6])
    with pytest.raises(
        DistillConfigError, match="'res2' \\(stride 4\\) has no teacher stage of the same stride.*MATCH"
    ):
        build_head(fake_resnet_fpn(**R18), teacher)
    head = build_head(fake_resnet_fpn(**R18), teacher, ["DISTILL.HGD.MATCH", "nearest_stride"])
    assert head.teacher_stages["res2"] == "res3" and head.teacher_stages["p2"] == "p3"
    assert head.teacher_stages["res4"] == "res4" and head.teacher_stages["p6"] == "p6"
    assert adapter_shape(head, "res2") == (64, 512)
    # The stride-4 student map is resized to the stride-8 teacher map; boxes use the teacher's stride.
    assert head.teacher_strides["res2"] == 8
    s = {"res2": torch.randn(2, 64, 8, 8), "p2": torch.randn(2, 128, 8, 8)}
    t = {"res2": torch.randn(2, 512, 4, 4), "p2": torch.randn(2, 128, 4, 4)}
    head = build_head(
        fake_resnet_fpn(**R18),
        teacher,
        ["DISTILL.HGD.MATCH", "nearest_stride", "DISTILL.HGD.IN_FEATURES", ["res2", "p2"]],
    )
    t_records = Records({"backbone.bottom_up": [((), {"res3": t["res2"]})], "backbone": [((), {"p3": t["p2"]})]})
    losses = head.stage_losses(records(s), t_records, step_inputs([instances([[0, 0, 20, 20]]), instances([])]))
    assert set(losses) == {"res2", "p2"} and all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_correspondence_unequal_strides():
    # A teacher seeing the image at twice the resolution: its res3 has the student's res2 stride.
    head = build_head(
        fake_resnet_fpn(**R18),
        fake_resnet_fpn(**R50),
        ["DISTILL.HGD.IN_FEATURES", ["res2", "res3", "res4", "p2", "p3", "p4", "p5"]],
        input_scale=2.0,
    )
    assert head.teacher_stages == {
        "res2": "res3",
        "res3": "res4",
        "res4": "res5",
        "p2": "p3",
        "p3": "p4",
        "p4": "p5",
        "p5": "p6",
    }
    assert head.teacher_strides["res2"] == 4.0 and adapter_shape(head, "res2") == (64, 512)
    with pytest.raises(DistillConfigError, match="'res5' \\(stride 32\\).*res5 \\(stride 16\\)"):
        build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50), input_scale=2.0)
    # A dilated teacher res5 (stride 16): nearest-stride matching keeps res5 -> res5 and resizes.
    dilated = fake_resnet_fpn(**R50, res5_stride=16)
    with pytest.raises(DistillConfigError, match="res5"):
        build_head(fake_resnet_fpn(**R18), dilated, ["DISTILL.HGD.IN_FEATURES", ["res5"]])
    head = build_head(
        fake_resnet_fpn(**R18), dilated, ["DISTILL.HGD.IN_FEATURES", ["res5"], "DISTILL.HGD.MATCH", "nearest_stride"]
    )
    assert head.teacher_stages == {"res5": "res5"} and head.teacher_strides["res5"] == 16
    ((_, adapted, target, _),) = head.pairing.pairs(
        records({"res5": torch.randn(1, 512, 2, 2)}), records({"res5": torch.randn(1, 2048, 4, 4)})
    )
    assert adapted.shape == target.shape == (1, 2048, 4, 4)


def test_correspondence_explicit_pairs_and_impossible_pairings():
    student, teacher = fake_resnet_fpn(**R18), fake_resnet_fpn(**R50)
    head = build_head(
        student, teacher, ["DISTILL.HGD.IN_FEATURES", ["res4", "p3"], "DISTILL.HGD.TEACHER_FEATURES", ["res5", "p3"]]
    )
    assert head.teacher_stages == {"res4": "res5", "p3": "p3"} and head.teacher_strides["res4"] == 32
    assert adapter_shape(head, "res4") == (256, 2048)
    bad = [
        # 16x apart: FeaturePairing refuses to resize across more than 8x.
        (["DISTILL.HGD.IN_FEATURES", ["res2"], "DISTILL.HGD.TEACHER_FEATURES", ["p6"]], "differ by 16x"),
        (
            ["DISTILL.HGD.IN_FEATURES", ["res2", "res3"], "DISTILL.HGD.TEACHER_FEATURES", ["res2"]],
            "one teacher stage per",
        ),
        (
            ["DISTILL.HGD.IN_FEATURES", ["res2"], "DISTILL.HGD.TEACHER_FEATURES", ["res9"]],
            "teacher has no feature named 'res9'",
        ),
        (["DISTILL.HGD.IN_FEATURES", ["p9"]], "student has no feature named 'p9'"),
        (["DISTILL.HGD.IN_FEATURES", ["p2", "p2"]], "twice"),
    ]
    for opts, message in bad:
        with pytest.raises(DistillConfigError, match=message):
            build_head(student, teacher, opts)
    # A teacher without an FPN has no stage of kind 'p'.
    no_fpn = _FakeModel({"res4": ShapeSpec(channels=1024, stride=16)}, None)
    with pytest.raises(DistillConfigError, match="no teacher stage of kind 'p'"):
        build_head(student, no_fpn, ["DISTILL.HGD.IN_FEATURES", ["p4"]])


def test_invalid_options_fail_at_build_time():
    student, teacher = fake_resnet_fpn(**R18), fake_resnet_fpn(**R50)
    bad = [
        (["DISTILL.HGD.MATCH", "depth"], "MATCH must be one of"),
        (["DISTILL.HGD.LOSS.DISTANCE", "l3"], "DISTANCE must be one of"),
        (["DISTILL.HGD.LOSS.NORMALIZER", "batch"], "NORMALIZER"),
        (["DISTILL.HGD.LOSS.FEATURE_NORM", "bn"], "FEATURE_NORM"),
        (["DISTILL.HGD.MICRO.MODE", "gt+att"], "MICRO.MODE must be one of"),
        (["DISTILL.HGD.MICRO.BG_WEIGHT", -0.1], "BG_WEIGHT"),
        (["DISTILL.HGD.MICRO.TEMPERATURE", 0.0], "TEMPERATURE"),
        (["DISTILL.HGD.MACRO.MODE", "auto"], "MACRO.MODE must be one of"),
        (["DISTILL.HGD.MACRO.WEIGHTS", [1.0, 2.0]], "MACRO: 2 stage weights given for 9 stages"),
        (["DISTILL.HGD.MACRO.MOMENTUM", 1.0], "momentum"),
        (["DISTILL.HGD.MACRO.NORMALIZE_TO", "two"], "normalize_to"),
        (["DISTILL.HGD.MACRO.LOG_VAR_LIMIT", 0.0], "limit"),
    ]
    for opts, message in bad:
        with pytest.raises(DistillConfigError, match=message):
            build_head(student, teacher, opts)


def test_shipped_configs_build_on_r18_r50_shapes():
    paths = [os.path.join(CONFIGS, "bccd", "distill_hgd_R50_R18.yaml")]
    variants = os.path.join(CONFIGS, os.pardir, "benchmarks", "configs", "bccd", "hgd_variants")
    paths += sorted(glob.glob(os.path.join(variants, "*.yaml")))
    assert len(paths) >= 6
    for path in paths:
        cfg = get_distill_cfg()
        merge_config(cfg, path)
        assert cfg.DISTILL.HEADS == ["hgd"], path
        head = HGD(cfg, BuildContext(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50), cfg, None))
        assert head.stages and head.macro.mode == cfg.DISTILL.HGD.MACRO.MODE
    cfg = get_distill_cfg()
    merge_config(cfg, os.path.join(CONFIGS, "coco", "distill_hgd_R101_R50.yaml"))
    assert cfg.DISTILL.TEACHER.CONFIG_FILE == "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.DISTILL.HEADS == ["hgd"]
    coco_r = dict(res_channels=(256, 512, 1024, 2048), fpn_channels=256)
    head = HGD(cfg, BuildContext(fake_resnet_fpn(**coco_r), fake_resnet_fpn(**coco_r), cfg, None))
    assert head.teacher_stages == {s: s for s in STAGES}


# ---------------------------------------------------------------------------------------------
# Golden values: micro weights and stage terms


def _np_attention(t, temperature):
    a = np.abs(t).mean(axis=1)  # (B, H, W)
    b, h, w = a.shape
    logits = a.reshape(b, -1) / temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (h * w * e / e.sum(axis=1, keepdims=True)).reshape(b, h, w)


def test_micro_weights_golden():
    rng = np.random.RandomState(1)
    t = rng.randn(2, 3, 4, 4)
    # Image 0: box (2, 2, 9, 5) on a stride-4 map covers cells x 0..2, y 0..1
    # (floor(2/4)=0 .. floor(9/4)=2, floor(2/4)=0 .. floor(5/4)=1); image 1 has no box.
    gt = [instances([[2, 2, 9, 5]], (16, 16)), instances([], (16, 16))]
    box = np.zeros((2, 4, 4))
    box[0, 0:2, 0:3] = 1
    fg, bg, temp = 1.0, 0.25, 0.5
    gt_map = bg + (fg - bg) * box
    att = _np_attention(t, temp)
    T = torch.tensor(t)
    expected = {"none": np.ones((2, 4, 4)), "gt": gt_map, "attention": att, "gt+attention": gt_map * att}
    for mode, want in expected.items():
        got = spatial_weight_map(mode, T, gt, 4, fg, bg, temp)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, err_msg=mode)
    # Hand value: attention of a map with |T| = [[0, 1]] at T = 1 is 2 * softmax([0, 1]).
    one = torch.tensor([[[[0.0, -1.0]]]])
    e = math.e
    np.testing.assert_allclose(
        spatial_weight_map("attention", one, [None], 4, temperature=1.0).numpy()[0, 0], [2 / (1 + e), 2 * e / (1 + e)]
    )


def test_head_stage_terms_golden_with_both_reweightings():
    """The full per-stage term WEIGHT * rho_k * L_k, with identity adapters, recomputed by hand."""
    student = fake_resnet_fpn(res_channels=(2, 2, 2, 2), fpn_channels=2)
    teacher = fake_resnet_fpn(res_channels=(2, 2, 2, 2), fpn_channels=2)
    opts = [
        "DISTILL.HGD.IN_FEATURES",
        ["res2", "p3"],
        "DISTILL.HGD.ADAPTER.ENABLED",
        False,
        "DISTILL.HGD.MICRO.MODE",
        "gt+attention",
        "DISTILL.HGD.MICRO.BG_WEIGHT",
        0.25,
        "DISTILL.HGD.MICRO.TEMPERATURE",
        0.5,
        "DISTILL.HGD.WEIGHT",
        3.0,
    ]
    rng = np.random.RandomState(2)
    s = {"res2": rng.randn(2, 2, 4, 4), "p3": rng.randn(2, 2, 2, 2)}
    t = {"res2": rng.randn(2, 2, 4, 4), "p3": rng.randn(2, 2, 2, 2)}
    gt = [instances([[2, 2, 9, 5]], (16, 16)), instances([], (16, 16))]
    # GT windows: stride 4 -> cells x 0..2, y 0..1; stride 8 -> x 0..1 (floor(9/8)=1), y 0.
    box = {"res2": np.zeros((2, 4, 4)), "p3": np.zeros((2, 2, 2))}
    box["res2"][0, 0:2, 0:3] = 1
    box["p3"][0, 0:1, 0:2] = 1
    raw = {}
    for k in ("res2", "p3"):
        w = (0.25 + 0.75 * box[k]) * _np_attention(t[k], 0.5)
        raw[k] = np_imitation_loss(s[k], t[k], w)
    S = records({k: torch.tensor(v) for k, v in s.items()})
    Tr = records({k: torch.tensor(v) for k, v in t.items()})

    # fixed: rho = configured weights.
    head = build_head(
        student, teacher, opts + ["DISTILL.HGD.MACRO.MODE", "fixed", "DISTILL.HGD.MACRO.WEIGHTS", [2.0, 0.5]]
    )
    terms = head(S, Tr, step_inputs(gt))
    assert terms["res2"].item() == pytest.approx(3.0 * 2.0 * raw["res2"], rel=1e-9)
    assert terms["p3"].item() == pytest.approx(3.0 * 0.5 * raw["p3"], rel=1e-9)

    # loss_norm, first step: m = L, rho_k = N (1/L_k) / sum_j (1/L_j): equal contributions
    # (the running statistics are fp32 buffers, hence the tolerance).
    head = build_head(student, teacher, opts)
    terms = head(S, Tr, step_inputs(gt))
    inv = {k: 1 / v for k, v in raw.items()}
    for k in raw:
        rho = 2 * inv[k] / sum(inv.values())
        assert terms[k].item() == pytest.approx(3.0 * rho * raw[k], rel=1e-6)
    assert terms["res2"].item() == pytest.approx(terms["p3"].item(), rel=1e-6)
    assert set(terms) == {"res2", "p3"}

    # learned: rho = exp(-s) = 1 at s = 0, and a regulariser term sum s = 0.
    head = build_head(student, teacher, opts + ["DISTILL.HGD.MACRO.MODE", "learned"])
    terms = head(S, Tr, step_inputs(gt))
    assert terms["res2"].item() == pytest.approx(3.0 * raw["res2"], rel=1e-9)
    assert terms["logvar"].item() == 0.0


def test_images_without_boxes():
    student, teacher = fake_resnet_fpn(**R18), fake_resnet_fpn(**R50)
    s = {"res3": torch.randn(2, 128, 4, 4), "p3": torch.randn(2, 128, 4, 4)}
    t = {"res3": torch.randn(2, 512, 4, 4), "p3": torch.randn(2, 128, 4, 4)}
    no_field = Instances((32, 32))  # hand-made Instances without gt_boxes
    gt = [instances([], (32, 32)), no_field]
    base = ["DISTILL.HGD.IN_FEATURES", ["res3", "p3"]]
    # Only GT weights and no background: nothing to imitate, zero losses that keep the graph.
    head = build_head(student, teacher, base + ["DISTILL.HGD.MICRO.MODE", "gt", "DISTILL.HGD.MICRO.BG_WEIGHT", 0.0])
    terms = head(records(s), records(t), step_inputs(gt))
    assert all(v.item() == 0.0 for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.pairing.parameters())
    assert torch.all(torch.isfinite(head.macro.weights())) and head.macro.weights().sum().item() == pytest.approx(2.0)
    # With a background weight: positive finite terms.
    head = build_head(student, teacher, base)
    terms = head(records(s), records(t), step_inputs(gt))
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())


# ---------------------------------------------------------------------------------------------
# Macro re-weighting


def test_loss_norm_golden_over_updates():
    sw = StageWeighting(["a", "b", "c"], "loss_norm", [1.0, 2.0, 1.0], momentum=0.5, normalize_to="num_stages")
    steps = [[4.0, 1.0, 0.5], [2.0, 3.0, 0.5], [6.0, 1.0, 1.5]]
    # EMA by hand: m1 = L1; m2 = 0.5 m1 + 0.5 L2; m3 = 0.5 m2 + 0.5 L3.
    m = [4.0, 1.0, 0.5]
    m = [0.5 * a + 0.5 * b for a, b in zip(m, [2.0, 3.0, 0.5])]  # [3, 2, 0.5]
    m = [0.5 * a + 0.5 * b for a, b in zip(m, [6.0, 1.0, 1.5])]  # [4.5, 1.5, 1.0]
    assert m == [4.5, 1.5, 1.0]
    inv = [1 / 4.5, 2 / 1.5, 1 / 1.0]
    expected = [3 * x / sum(inv) for x in inv]
    for losses in steps:
        weighted, weights, reg = sw({k: torch.tensor(v) for k, v in zip("abc", losses)})
    np.testing.assert_allclose(sw.loss_ema.numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    assert reg is None and int(sw.num_updates) == 3
    assert weighted["a"].item() == pytest.approx(expected[0] * 6.0, rel=1e-6)
    # "one": the same proportions summing to 1.
    one = StageWeighting(["a", "b", "c"], "loss_norm", [1.0, 2.0, 1.0], momentum=0.5, normalize_to="one")
    one.load_state_dict(sw.state_dict())
    np.testing.assert_allclose(one.weights().numpy(), np.array(expected) / 3, rtol=1e-6)
    # Not updated in eval mode.
    sw.eval()
    sw({k: torch.tensor(100.0) for k in "abc"})
    assert int(sw.num_updates) == 3


def test_macro_weights_stay_normalised_over_many_updates():
    rng = np.random.RandomState(3)
    scales = np.array([1e-3, 1e-1, 1.0, 10.0, 1e3])
    for normalize_to, total in (("num_stages", 5.0), ("one", 1.0)):
        sw = StageWeighting(list("abcde"), "loss_norm", [1, 1, 2, 1, 0.5], momentum=0.9, normalize_to=normalize_to)
        for i in range(1000):
            losses = scales * rng.lognormal(0, 1, size=5)
            if i % 97 == 0:
                losses[i % 5] = 0.0  # a stage whose loss vanishes for a step
            _, weights, _ = sw({k: torch.tensor(v) for k, v in zip("abcde", losses)})
            assert torch.all(torch.isfinite(weights)) and torch.all(weights > 0)
            assert weights.sum().item() == pytest.approx(total, rel=1e-5)
    # Constant losses: every stage contributes the same (equal base weights).
    sw = StageWeighting(list("abc"), "loss_norm")
    losses = {"a": torch.tensor(0.05), "b": torch.tensor(1.0), "c": torch.tensor(250.0)}
    for _ in range(50):
        weighted, weights, _ = sw(losses)
    contributions = [weighted[k].item() for k in "abc"]
    assert contributions == pytest.approx([contributions[0]] * 3, rel=1e-5)
    # A stage whose loss is always zero cannot take all the weight (ratios bounded by 1e4).
    sw = StageWeighting(list("ab"), "loss_norm")
    for _ in range(10):
        _, weights, _ = sw({"a": torch.tensor(0.0), "b": torch.tensor(1.0)})
    assert weights[1].item() == pytest.approx(2 / (1 + 1e4), rel=1e-4)


def test_learned_weights_gradient_bound_and_fixed_point():
    sw = StageWeighting(["a", "b"], "learned", log_var_limit=4.0)
    weighted, weights, reg = sw({"a": torch.tensor(3.0), "b": torch.tensor(0.5)})
    (sum(weighted.values()) + reg).backward()
    # d/du [exp(-s) L + s] at u = 0 (s = 4 tanh(u / 4), ds/du = 1) is 1 - L.
    np.testing.assert_allclose(sw.log_vars.grad.numpy(), [1 - 3.0, 1 - 0.5], rtol=1e-6)
    # Gradient descent: rho -> 1 / L where that is within bounds; the bound holds otherwise.
    sw = StageWeighting(["a", "b", "c"], "learned", log_var_limit=4.0)
    opt = torch.optim.SGD(sw.parameters(), lr=0.1)
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.25), "c": torch.tensor(1e4)}
    for _ in range(500):
        opt.zero_grad()
        weighted, weights, reg = sw(losses)
        (sum(weighted.values()) + reg).backward()
        opt.step()
        assert torch.all(weights >= math.exp(-4.0)) and torch.all(weights <= math.exp(4.0))
    assert weights[0].item() == pytest.approx(0.5, rel=1e-2)
    assert weights[1].item() == pytest.approx(4.0, rel=1e-2)
    assert weights[2].item() < 0.05 and weights[2].item() > math.exp(-4.0)


def test_running_statistics_are_buffers_that_survive_a_reload():
    sw = StageWeighting(["a", "b"], "loss_norm", momentum=0.8)
    for v in ([1.0, 4.0], [3.0, 2.0]):
        sw({"a": torch.tensor(v[0]), "b": torch.tensor(v[1])})
    state = sw.state_dict()
    assert set(state) == {"loss_ema", "num_updates"}
    fresh = StageWeighting(["a", "b"], "loss_norm", momentum=0.8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weights(), sw.weights())
    assert int(fresh.num_updates) == 2
    # The head checkpoints them (and the learned log-variances) with its adapters.
    head = build_head(fake_resnet_fpn(**R18), fake_resnet_fpn(**R50), ["DISTILL.HGD.MACRO.MODE", "learned"])
    assert {"macro.loss_ema", "macro.num_updates", "macro.log_vars"} <= set(head.state_dict())


# ---------------------------------------------------------------------------------------------
# A 2-iteration BCCD run with the R50 teacher and the R18 student


@pytest.mark.train
def test_bccd_run_logs_every_stage_term_and_weight(tmp_path, teacher_r50_weights):
    from d2kd import DistillTrainer

    cfg = distill_cfg(
        "bccd/distill_hgd_R50_R18.yaml", tmp_path, teacher_r50_weights, teacher_config="bccd/teacher_R50_FPN.yaml"
    )
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.heads["hgd"]
    assert head.teacher_stages == {s: s for s in STAGES}
    assert adapter_shape(head, "res5") == (512, 2048)
    trainer.train()
    storage = trainer.storage
    sums = np.zeros(2)
    for stage in STAGES:
        terms = storage.history(f"loss_kd_hgd_{stage}").values()
        weights = storage.history(f"kd_hgd/weight_{stage}").values()
        raws = storage.history(f"kd_hgd/raw_{stage}").values()
        assert len(terms) == len(weights) == len(raws) == 2, stage
        assert all(np.isfinite(v) and v > 0 for v, _ in terms + weights + raws), stage
        # The logged term is WEIGHT (0.2 in the BCCD preset) times the logged weight times the raw loss.
        assert cfg.DISTILL.HGD.WEIGHT == 0.2
        for (term, _), (weight, _), (raw, _) in zip(terms, weights, raws):
            assert term == pytest.approx(cfg.DISTILL.HGD.WEIGHT * weight * raw, rel=1e-4), stage
        sums += [w for w, _ in weights]
    np.testing.assert_allclose(sums, [9.0, 9.0], rtol=1e-5)
    # The weights are not losses: the loss dict holds only terms.
    assert "loss_kd_hgd_weight_res2" not in storage.histories()
    assert int(head.macro.num_updates) == 2
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)["distiller"]
    torch.testing.assert_close(saved["hgd.macro.loss_ema"], head.macro.loss_ema)
    assert int(saved["hgd.macro.num_updates"]) == 2
