"""Chen et al. 2017 (docs/methods/chen2017.md): loss golden values, head wiring, presets."""

import math

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2kd import DistillTrainer, get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import BuildContext, DistillConfigError
from d2kd.heads.chen2017 import Chen2017
from d2kd.heads.chen2017 import (
    background_last_class_weights,
    binary_weighted_soft_cross_entropy,
    teacher_bounded_regression,
    weighted_soft_cross_entropy,
)

from conftest import distill_cfg, load_test_cfg
from conftest import fake_fpn_context


FULL = "bccd/distill_chen2017_R50_R18.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On the shared 2-core machine one intra-op thread avoids OpenMP spin-waits (~4x less CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_deltas(boxes, gt, weights):
    """Detectron2's Box2BoxTransform.get_deltas, written out (x0, y0, x1, y1 boxes)."""
    wx, wy, ww, wh = weights
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * np.log(gw / pw), wh * np.log(gh / ph)], axis=1)


def _np_bound(rs, rt, y, m):
    ds, dt = ((rs - y) ** 2).sum(1), ((rt - y) ** 2).sum(1)
    return np.where(ds + m > dt, ds, 0.0)


# ---------------------------------------------------------------------------- losses
def test_binary_weighted_soft_ce_golden():
    # Hand value: both logits 0 -> q = s = 1/2: -(1 * 1/2 * log 1/2 + 1.5 * 1/2 * log 1/2) = 1.25 log 2.
    got = binary_weighted_soft_cross_entropy(torch.zeros(1), torch.zeros(1), 1.0, 1.5, 1.0)
    assert got.item() == pytest.approx(1.25 * math.log(2))
    # A confident background teacher: the whole loss is w_bg * -log(1 - s).
    got = binary_weighted_soft_cross_entropy(torch.tensor([1.0]), torch.tensor([-60.0]), 1.0, 1.5, 1.0)
    assert got.item() == pytest.approx(1.5 * -math.log(1 - _np_sigmoid(1.0)))
    # Numpy formula, T = 2.
    zs = np.array([[0.3, -1.2, 2.0], [4.0, -0.5, 0.0]])
    zt = np.array([[1.0, 0.7, -3.0], [2.5, -2.0, 0.2]])
    T = 2.0
    q, s = _np_sigmoid(zt / T), _np_sigmoid(zs / T)
    expected = -(1.0 * q * np.log(s) + 1.5 * (1 - q) * np.log(1 - s))
    student = torch.tensor(zs, requires_grad=True)
    teacher = torch.tensor(zt, requires_grad=True)
    got = binary_weighted_soft_cross_entropy(student, teacher, 1.0, 1.5, T)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10)
    got.sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_weighted_soft_ce_background_weight_on_last_column():
    weights = background_last_class_weights(2, 1.5)
    assert weights.tolist() == [1.0, 1.0, 1.5]
    uniform_student = torch.zeros(1, 3)
    # Teacher certain of the background (last column): 1.5 * -log(1/3).
    got = weighted_soft_cross_entropy(uniform_student, torch.tensor([[0.0, 0.0, 80.0]]), weights)
    assert got.item() == pytest.approx(1.5 * math.log(3))
    # Teacher certain of class 0 (a foreground class): weight 1.
    got = weighted_soft_cross_entropy(uniform_student, torch.tensor([[80.0, 0.0, 0.0]]), weights)
    assert got.item() == pytest.approx(math.log(3))
    # Numpy formula with T = 2: -sum_c w_c P_t[c] log P_s[c], the weight indexed by c.
    zs = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0], [-2.0, 1.0, 0.0, 0.5]])
    zt = np.array([[2.0, 0.0, 1.0, -2.0], [1.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 4.0]])
    w = np.array([1.0, 1.0, 1.0, 1.5])
    T = 2.0
    expected = -(w * _np_softmax(zt / T) * np.log(_np_softmax(zs / T))).sum(1)
    student = torch.tensor(zs, requires_grad=True)
    teacher = torch.tensor(zt, requires_grad=True)
    got = weighted_soft_cross_entropy(student, teacher, background_last_class_weights(3, 1.5).double(), T)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10)
    got.sum().backward()
    assert student.grad is not None and teacher.grad is None


def test_teacher_bound_zero_when_student_beats_teacher_by_margin():
    y = torch.zeros(1, 4)
    student = torch.tensor([[0.1, 0.0, 0.0, 0.0]], requires_grad=True)  # ||.||^2 = 0.01
    teacher = torch.tensor([[0.5, 0.0, 0.0, 0.0]], requires_grad=True)  # ||.||^2 = 0.25
    loss = teacher_bounded_regression(student, teacher, y, margin=0.1)
    assert loss.item() == 0.0
    # Within the margin: 0.01 + 0.3 > 0.25 -> the student's squared L2.
    assert teacher_bounded_regression(student, teacher, y, margin=0.3).item() == pytest.approx(0.01)


def test_teacher_bound_equals_student_l2_otherwise_and_grad_only_to_student():
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    student = torch.tensor([[1.3, 1.4, 0.0, 0.0]], requires_grad=True)  # 0.09 + 0.16 = 0.25
    teacher = torch.tensor([[1.2, 1.0, 0.0, 0.0]], requires_grad=True)  # 0.04
    loss = teacher_bounded_regression(student, teacher, y, margin=0.0)
    assert loss.item() == pytest.approx(0.25)
    loss.sum().backward()
    np.testing.assert_allclose(student.grad.numpy(), [[0.6, 0.8, 0.0, 0.0]], rtol=1e-6)
    assert teacher.grad is None


def test_teacher_bound_is_per_sample_on_the_whole_vector():
    # Element-wise, x would be penalised (0.09 > 0); on the whole vector 0.09 < 0.25: no loss.
    y = torch.zeros(3, 4)
    student = torch.tensor([[0.3, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.2]])
    teacher = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = teacher_bounded_regression(student, teacher, y, margin=0.0)
    np.testing.assert_allclose(got.numpy(), [0.0, 0.09, 0.05], rtol=1e-6)


# ---------------------------------------------------------------------------- hints


def _hint_only_cfg(adapter):
    cfg = get_distill_cfg()
    cfg.merge_from_list([
        "DISTILL.CHEN2017.CLS.ENABLED", False, "DISTILL.CHEN2017.REG.ENABLED", False,
        "DISTILL.CHEN2017.HINT.IN_FEATURES", ["p2", "p3"], "DISTILL.CHEN2017.HINT.ADAPTER.ENABLED", adapter,
    ])
    return cfg


def test_hint_without_adapter_is_gamma_times_mean_squared_error():
    head = Chen2017(_hint_only_cfg(False), fake_fpn_context(3, 3))
    assert len(list(head.parameters())) == 0 and head.teacher_parts == {"backbone"}
    rng = np.random.default_rng(0)
    s = {k: rng.normal(size=(2, 3, 4, 4)) for k in ("p2", "p3")}
    t = {k: rng.normal(size=(2, 3, 4, 4)) for k in ("p2", "p3")}
    records = lambda d: Records({"backbone": [((), {k: torch.tensor(v) for k, v in d.items()})]})  # noqa: E731
    terms = head(records(s), records(t), None)
    assert set(terms) == {"hint_p2", "hint_p3"}
    for k in ("p2", "p3"):
        assert terms[f"hint_{k}"].item() == pytest.approx(0.5 * np.mean((s[k] - t[k]) ** 2), rel=1e-9)


def test_hint_with_adapter_regresses_adapted_student():
    head = Chen2017(_hint_only_cfg(True), fake_fpn_context(3, 5)).double()
    rng = np.random.default_rng(1)
    s = rng.normal(size=(2, 3, 4, 4))
    t = rng.normal(size=(2, 5, 4, 4))
    conv = head.pairing.adapters["p2"].conv
    weight, bias = conv.weight.detach().numpy()[:, :, 0, 0], conv.bias.detach().numpy()
    adapted = np.einsum("oc,bchw->bohw", weight, s) + bias[None, :, None, None]
    s_rec = Records({"backbone": [((), {"p2": torch.tensor(s), "p3": torch.tensor(s)})]})
    t_rec = Records({"backbone": [((), {"p2": torch.tensor(t), "p3": torch.tensor(t)})]})
    terms = head(s_rec, t_rec, None)
    assert terms["hint_p2"].item() == pytest.approx(0.5 * np.mean((adapted - t) ** 2), rel=1e-9)
    terms["hint_p2"].backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_hint_without_adapter_needs_equal_channels():
    with pytest.raises(ValueError, match="adapter is disabled.*3 channels.*teacher 5"):
        Chen2017(_hint_only_cfg(False), fake_fpn_context(3, 5))


# ---------------------------------------------------------------------------- RPN / RCN wiring
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An R18 student and teacher of the BCCD test config, and the full-method cfg."""
    d = tmp_path_factory.mktemp("chen_models")
    cfg = load_test_cfg(FULL, d)
    torch.manual_seed(0)
    student, teacher = build_model(cfg), build_model(cfg)
    return cfg, student, teacher


def _head(models, opts=(), teacher=None):
    cfg, student, default_teacher = models
    cfg = cfg.clone()
    cfg.merge_from_list(list(opts))
    teacher = teacher or default_teacher
    return Chen2017(cfg, BuildContext(student, teacher, cfg, cfg))


def test_rcn_terms_golden_with_an_image_without_gt(models):
    head = _head(models, ["DISTILL.CHEN2017.STAGES", ["rcn"], "DISTILL.CHEN2017.HINT.ENABLED", False,
                          "DISTILL.CHEN2017.REG.MARGIN_RCN", 0.05])
    K, mu, m = 3, 0.5, 0.05
    rng = np.random.default_rng(2)
    # Image 1: RoIs of class 0, background, class 2, class 1. Image 2: no GT (no gt_boxes field).
    boxes1 = np.array([[10, 10, 50, 60], [0, 0, 20, 20], [30, 40, 90, 80], [5, 50, 45, 95]], dtype=np.float64)
    gt1 = np.array([[12, 8, 55, 58], [0, 0, 1, 1], [28, 45, 85, 84], [8, 47, 40, 99]], dtype=np.float64)
    boxes2 = np.array([[5, 5, 25, 30], [40, 40, 60, 70]], dtype=np.float64)
    classes = np.array([0, K, 2, 1, K, K])
    R = len(classes)
    p1 = Instances((100, 100), proposal_boxes=Boxes(torch.tensor(boxes1)), gt_classes=torch.tensor(classes[:4]),
                   gt_boxes=Boxes(torch.tensor(gt1)))
    p2 = Instances((100, 100), proposal_boxes=Boxes(torch.tensor(boxes2)), gt_classes=torch.tensor(classes[4:]))
    zs, zt = rng.normal(size=(R, K + 1)), rng.normal(size=(R, K + 1))
    ds, dt = rng.normal(scale=3.0, size=(R, 4 * K)), rng.normal(scale=3.0, size=(R, 4 * K))
    # GT-class columns of the positives, placed around the GT deltas (weights 10, 10, 5, 5):
    fg = np.array([0, 2, 3])
    y = _np_deltas(boxes1[fg], gt1[fg], (10.0, 10.0, 5.0, 5.0))
    offsets = {  # (student, teacher) errors: bound active / active only thanks to m / inactive
        0: ([0.3, 0, 0, 0], [0.1, 0, 0, 0]),
        2: ([0.2, 0, 0, 0], [0.0, 0.25, 0, 0]),
        3: ([0.3, 0, 0, 0], [0.0, 0, 0.5, 0]),
    }
    for row, (i, (e_s, e_t)) in enumerate(offsets.items()):
        c = classes[i]
        ds[i, 4 * c: 4 * c + 4] = y[row] + e_s
        dt[i, 4 * c: 4 * c + 4] = y[row] + e_t
    student = Records({
        "roi_heads.box_predictor": [((), (torch.tensor(zs, requires_grad=True), torch.tensor(ds, requires_grad=True)))],
        "roi_heads.label_and_sample_proposals": [((), [p1, p2])],
    })
    teacher = Records({"roi_heads.box_predictor": [((), (torch.tensor(zt), torch.tensor(dt)))]})
    terms = head.double()(student, teacher, None)

    w = np.array([1.0, 1.0, 1.0, 1.5])  # background = last column
    soft = -(w * _np_softmax(zt) * np.log(_np_softmax(zs))).sum() / R
    hard = -np.log(_np_softmax(zs)[np.arange(R), classes]).sum() / R
    cols = lambda d: np.stack([d[i, 4 * classes[i]: 4 * classes[i] + 4] for i in fg])  # noqa: E731
    bound = _np_bound(cols(ds), cols(dt), y, m)
    np.testing.assert_allclose(bound, [0.09, 0.04, 0.0], atol=1e-9)  # the case covers all branches
    reg = 1.0 * 0.5 * bound.sum() / R
    assert set(terms) == {"rcn_cls", "rcn_cls_hard", "rcn_reg"}
    assert terms["rcn_cls"].item() == pytest.approx((1 - mu) * soft, rel=1e-9)
    assert terms["rcn_cls_hard"].item() == pytest.approx((mu - 1) * hard, rel=1e-9)
    assert terms["rcn_reg"].item() == pytest.approx(reg, rel=1e-6)  # Boxes are float32


def test_rpn_terms_golden_on_sampled_anchors(models):
    head = _head(models, ["DISTILL.CHEN2017.STAGES", ["rpn"], "DISTILL.CHEN2017.HINT.ENABLED", False,
                          "DISTILL.CHEN2017.CLS.TEMPERATURE", 2.0, "DISTILL.CHEN2017.CLS.MU", 0.25])
    mu, T, B, A, W = 0.25, 2.0, 2, 2, 2
    M = models[0].MODEL.RPN.BATCH_SIZE_PER_IMAGE * B
    rng = np.random.default_rng(3)
    obj_s, obj_t = rng.normal(size=(B, A, 1, W)), rng.normal(size=(B, A, 1, W))
    del_s, del_t = rng.normal(scale=0.2, size=(B, A * 4, 1, W)), rng.normal(scale=0.2, size=(B, A * 4, 1, W))
    # Anchor index r = x * A + a (Detectron2's order: level, y, x, anchor).
    anchors = np.array([[0, 0, 16, 16], [-8, 0, 24, 16], [16, 0, 32, 16], [8, 0, 40, 16]], dtype=np.float64)
    labels = np.array([[1, 0, -1, 1], [0, -1, 0, -1]])  # image 2 has no GT: negatives only
    matched = np.zeros((B, 4, 4))
    matched[0, 0] = [2, 1, 18, 15]
    matched[0, 3] = [6, -1, 38, 17]
    gt_instances = [None, None]
    student = Records({
        "proposal_generator.rpn_head": [
            ((), ([torch.tensor(obj_s, requires_grad=True)], [torch.tensor(del_s, requires_grad=True)]))
        ],
        "proposal_generator.label_and_sample_anchors": [(
            ([Boxes(torch.tensor(anchors))], gt_instances),
            ([torch.tensor(lab) for lab in labels], [torch.tensor(mb) for mb in matched]),
        )],
    })
    teacher = Records({"proposal_generator.rpn_head": [((), ([torch.tensor(obj_t)], [torch.tensor(del_t)]))]})
    terms = head.double()(student, teacher, None)

    def per_anchor(obj, deltas, b, r):
        x, a = divmod(r, A)
        return obj[b, a, 0, x], deltas[b, 4 * a: 4 * a + 4, 0, x]

    soft = hard = reg = 0.0
    for b in range(B):
        for r in range(4):
            if labels[b, r] < 0:
                continue
            zs_, ds_ = per_anchor(obj_s, del_s, b, r)
            zt_, dt_ = per_anchor(obj_t, del_t, b, r)
            q, s = _np_sigmoid(zt_ / T), _np_sigmoid(zs_ / T)
            soft += -(q * np.log(s) + 1.5 * (1 - q) * np.log(1 - s))
            p = _np_sigmoid(zs_)
            hard += -np.log(p) if labels[b, r] == 1 else -np.log(1 - p)
            if labels[b, r] == 1:
                y = _np_deltas(anchors[r: r + 1], matched[b, r: r + 1], (1.0, 1.0, 1.0, 1.0))
                reg += _np_bound(ds_[None], dt_[None], y, 0.0)[0]
    assert set(terms) == {"rpn_cls", "rpn_cls_hard", "rpn_reg"}
    assert terms["rpn_cls"].item() == pytest.approx((1 - mu) * soft / M, rel=1e-9)
    assert terms["rpn_cls_hard"].item() == pytest.approx((mu - 1) * hard / M, rel=1e-9)
    assert terms["rpn_reg"].item() == pytest.approx(0.5 * reg / M, rel=1e-6)  # Boxes are float32
    assert reg > 0


def test_l2_mode_uses_the_teacher_as_target(models):
    head = _head(models, ["DISTILL.CHEN2017.STAGES", ["rcn"], "DISTILL.CHEN2017.HINT.ENABLED", False,
                          "DISTILL.CHEN2017.CLS.ENABLED", False, "DISTILL.CHEN2017.REG.MODE", "l2"])
    p = Instances((50, 50), proposal_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])),
                  gt_classes=torch.tensor([1, 3]), gt_boxes=Boxes(torch.tensor([[1.0, 1, 11, 12], [0, 0, 1, 1]])))
    ds, dt = torch.zeros(2, 12), torch.zeros(2, 12)
    dt[0, 4:8] = torch.tensor([1.0, 2.0, 0.0, 0.0])  # class 1 columns of the positive RoI
    dt[1, 0:4] = 100.0  # the negative RoI is ignored
    student = Records({"roi_heads.box_predictor": [((), (torch.zeros(2, 4), ds))],
                       "roi_heads.label_and_sample_proposals": [((), [p])]})
    teacher = Records({"roi_heads.box_predictor": [((), (torch.zeros(2, 4), dt))]})
    assert head(student, teacher, None)["rcn_reg"].item() == pytest.approx(1.0 * 0.5 * 5.0 / 2)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "opts, message",
    [
        (["DISTILL.CHEN2017.CLS.MU", 1.5], r"CLS.MU must be in \[0, 1\]"),
        (["DISTILL.CHEN2017.STAGES", ["rpn", "fast_rcnn"]], r"unknown entries \['fast_rcnn'\]"),
        (["DISTILL.CHEN2017.CLS.ENABLED", False, "DISTILL.CHEN2017.REG.ENABLED", False,
          "DISTILL.CHEN2017.HINT.ENABLED", False], "all disabled"),
        (["DISTILL.CHEN2017.REG.MODE", "smooth"], "REG.MODE must be one of"),
        (["DISTILL.CHEN2017.CLS.TEMPERATURE", 0.0], "TEMPERATURE must be > 0"),
        (["DISTILL.TEACHER.INPUT_SCALE", 2.0], "INPUT_SCALE is 2.0.*Set it to 1.0"),
    ],
)
def test_bad_config_fails_at_build(models, opts, message):
    with pytest.raises(DistillConfigError, match=message):
        _head(models, opts)


def test_teacher_with_other_anchors_fails_at_build(models, tmp_path):
    other_anchors = ["MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]]]
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path, other_anchors)
    with pytest.raises(DistillConfigError, match="anchors differ.*MODEL.ANCHOR_GENERATOR"):
        _head(models, teacher=build_model(cfg))
    # Without the RPN stage the same teacher is fine.
    _head(models, ["DISTILL.CHEN2017.STAGES", ["rcn"]], teacher=build_model(cfg))


# ---------------------------------------------------------------------------- end to end
PRESETS = {
    FULL: ["rpn_cls", "rpn_cls_hard", "rpn_reg", "rcn_cls", "rcn_cls_hard", "rcn_reg",
           "hint_p2", "hint_p3", "hint_p4", "hint_p5"],
    "../benchmarks/configs/bccd/ablation/chen2017_CLS.yaml": ["rpn_cls", "rpn_cls_hard", "rcn_cls", "rcn_cls_hard"],
    "../benchmarks/configs/bccd/ablation/chen2017_CLS-W.yaml": ["rpn_cls", "rpn_cls_hard", "rcn_cls", "rcn_cls_hard"],
    "../benchmarks/configs/bccd/ablation/chen2017_L2.yaml": ["rpn_reg", "rcn_reg"],
    "../benchmarks/configs/bccd/ablation/chen2017_L2-B.yaml": ["rpn_reg", "rcn_reg"],
    "../benchmarks/configs/bccd/ablation/chen2017_Hints.yaml": ["hint_p2", "hint_p3", "hint_p4", "hint_p5"],
    "../benchmarks/configs/bccd/ablation/chen2017_Hints-A.yaml": ["hint_p2", "hint_p3", "hint_p4", "hint_p5"],
}


@pytest.mark.train
@pytest.mark.parametrize("config", sorted(PRESETS))
def test_preset_trains_two_iterations(config, tmp_path, teacher_r18_weights):
    cfg = distill_cfg(config, tmp_path, teacher_r18_weights)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    logged = {k for k in trainer.storage.histories() if k.startswith("loss_kd_")}
    assert logged == {f"loss_kd_chen2017_{t}" for t in PRESETS[config]}
    for key in logged:
        values = [v for v, _ in trainer.storage.history(key).values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (key, values)
    has_adapters = len(list(trainer.heads.parameters())) > 0
    assert has_adapters == (config.endswith(("R50_R18.yaml", "Hints-A.yaml")))


@pytest.mark.train
def test_images_without_gt_and_hard_term_matches_the_detector(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(FULL, tmp_path, teacher_r18_weights)
    trainer = DistillTrainer(cfg)
    model = trainer._trainer.model
    batch = next(trainer._trainer._data_loader_iter)
    mu = cfg.DISTILL.CHEN2017.CLS.MU
    with EventStorage(0):
        for empty in ([0], [0, 1]):
            for i in empty:
                size = batch[i]["instances"].image_size
                batch[i]["instances"] = Instances(
                    size, gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long)
                )
            losses = model(batch)
            assert all(torch.isfinite(v) for v in losses.values()), losses
            # The head's recomputed hard CE is the detector's own: the total hard weight is mu.
            for det, kd in (("loss_cls", "rcn_cls_hard"), ("loss_rpn_cls", "rpn_cls_hard")):
                assert losses[f"loss_kd_chen2017_{kd}"].item() == pytest.approx((mu - 1) * losses[det].item(), rel=1e-5)
            sum(losses.values()).backward()
    # With no GT anywhere there is no positive sample: the regression terms are exactly zero.
    assert losses["loss_kd_chen2017_rpn_reg"].item() == 0.0 and losses["loss_kd_chen2017_rcn_reg"].item() == 0.0


def test_teacher_with_other_delta_weights_fails_at_build_only_for_reg(models, tmp_path):
    other_weights = ["MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (20.0, 20.0, 10.0, 10.0)]
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path, other_weights)
    teacher = build_model(cfg)
    with pytest.raises(DistillConfigError, match="RoI box deltas.*MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS"):
        _head(models, teacher=teacher)
    _head(models, ["DISTILL.CHEN2017.REG.ENABLED", False], teacher=teacher)
