"""
Breadth: RetinaNet students and teachers, heterogeneous teacher/student pairs
(detector type, FPN width, input resolution, input format), a swapped student backbone
(MobileNetV2-FPN), Mask R-CNN students and model-zoo teachers by name.
"""

import copy
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2kd.config import merge_config
from d2kd import DistillTrainer, get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import DISTILL_HEAD_REGISTRY, BuildContext, DistillConfigError, build_distill_heads
from d2kd.modeling.distiller import DistillationModel
from d2kd.modeling.feature_pairs import FeaturePairing
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import build_teacher, build_teacher_cfg

from conftest import CONFIGS, distill_cfg, load_test_cfg, save_random_checkpoint

RETINA_STUDENT = "bccd/retinanet_R18_FPN_student.yaml"
RETINA_LEVELS = ["p3", "p4", "p5", "p6", "p7"]
IMAGENET_RGB = ["MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "MODEL.PIXEL_STD", [58.395, 57.12, 57.375], "INPUT.FORMAT", "RGB"]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retina_r18_weights(tmp_path_factory):
    """Weights of the RetinaNet R18-FPN BCCD model, the RetinaNet teacher of these tests."""
    d = tmp_path_factory.mktemp("retina_r18")
    return save_random_checkpoint(RETINA_STUDENT, str(d / "teacher.pth"))


def train(cfg):
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


def latest_losses(trainer):
    return {k: h.latest() for k, h in trainer.storage.histories().items() if k.startswith("loss")}


def assert_logged_and_finite(trainer, keys):
    losses = latest_losses(trainer)
    missing = [k for k in keys if k not in losses]
    assert not missing, f"not logged: {missing}; logged: {sorted(losses)}"
    bad = {k: losses[k] for k in keys if not math.isfinite(losses[k])}
    assert not bad, f"non-finite: {bad}"
    return losses


def build_distiller(cfg):
    """Student, teacher, heads and the DistillationModel of ``cfg`` without a trainer or data loader."""
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher = build_teacher(cfg)
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher.d2kd_cfg))
    return DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg), cfg.DISTILL.TEACHER.INPUT_SCALE)


def synthetic_batch(sizes=((128, 160), (128, 176)), empty=(1,)):
    """Images with a few boxes; the images whose index is in ``empty`` have no ground truth."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for i, (h, w) in enumerate(sizes):
        instances = Instances((h, w))
        boxes = [] if i in empty else [[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 90.0, 44.0], [30.0, 80.0, 120.0, 125.0]]
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor([0, 2, 1][: len(boxes)], dtype=torch.int64)
        image = torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def step(model, batch):
    """One training forward of a DistillationModel (losses dict)."""
    model.train()
    with EventStorage(0):
        return model(batch)


class _Inputs:
    """Forward hooks keeping the positional inputs of modules, by name."""

    def __init__(self, **modules):
        self.data = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.data[name].append(inputs)

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------
# RetinaNet
# ---------------------------------------------------------------------------------------


def test_retinanet_configs_mirror_the_rcnn_base():
    teacher = load_test_cfg("bccd/retinanet_R50_FPN_teacher.yaml", "/tmp/unused")
    student = load_test_cfg(RETINA_STUDENT, "/tmp/unused")
    rcnn = load_test_cfg("bccd/student_R18_FPN.yaml", "/tmp/unused")
    for cfg, depth in ((teacher, 50), (student, 18)):
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.RESNETS.DEPTH == depth
        assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.RETINANET.NORM) == ("GN", "GN", "GN")
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.FPN.OUT_CHANNELS == 128
        assert cfg.MODEL.RETINANET.NUM_CLASSES == 3 and list(cfg.MODEL.RETINANET.IN_FEATURES) == RETINA_LEVELS
        for key in ("PIXEL_MEAN", "PIXEL_STD"):
            assert list(cfg.MODEL[key]) == list(rcnn.MODEL[key])
    assert [s[0] for s in student.MODEL.ANCHOR_GENERATOR.SIZES] == [16, 32, 64, 128, 256]
    base = get_distill_cfg()
    merge_config(base, os.path.join(CONFIGS, RETINA_STUDENT))
    assert base.INPUT.MIN_SIZE_TRAIN == (320,)
    model = build_model(teacher)
    assert type(model).__name__ == "RetinaNet" and model.head_in_features == RETINA_LEVELS
    assert isinstance(model.head.cls_subnet[1], nn.GroupNorm) and model.anchor_generator.num_anchors == [9] * 5


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


@pytest.fixture(scope="module")
def retina_pair(tmp_path_factory, retina_r18_weights):
    """A RetinaNet student and teacher config (for build-time checks and single forwards)."""
    d = tmp_path_factory.mktemp("retina_pair")
    return distill_cfg(
        "bccd/distill_fitnet_retinanet_R50_R18.yaml", d, retina_r18_weights, teacher_config=RETINA_STUDENT
    )


@pytest.fixture(scope="module")
def retina_models(retina_pair):
    torch.manual_seed(0)
    return build_model(retina_pair), build_teacher(retina_pair)


def _heads_cfg(base, heads, opts=()):
    cfg = base.clone()
    cfg.defrost()
    cfg.DISTILL.HEADS = list(heads)
    cfg.merge_from_list(list(opts))
    return cfg


# Two-stage-only methods: (head, options that keep its two-stage part on, expected message).
TWO_STAGE_ONLY = [
    ("kd", [], "RoI box head"),
    ("chen2017", ["DISTILL.CHEN2017.STAGES", ["rcn"], "DISTILL.CHEN2017.HINT.ENABLED", False], "RoI box head"),
    ("chen2017", ["DISTILL.CHEN2017.STAGES", ["rpn"], "DISTILL.CHEN2017.HINT.ENABLED", False], "RPN"),
    ("defeat", ["DISTILL.DEFEAT.NECK_KD", False, "DISTILL.DEFEAT.IN_FEATURES", RETINA_LEVELS], "RoI box head"),
]


@pytest.mark.parametrize("head,opts,match", TWO_STAGE_ONLY, ids=[f"{h}-{i}" for i, (h, _, _) in enumerate(TWO_STAGE_ONLY)])
def test_two_stage_methods_on_retinanet_are_build_time_errors(retina_pair, retina_models, head, opts, match):
    if head.lower() not in {n.lower() for n, _ in DISTILL_HEAD_REGISTRY}:
        pytest.skip(f"head {head} is not registered yet")
    cfg = _heads_cfg(retina_pair, [head], opts)
    student, teacher = retina_models
    with pytest.raises(DistillConfigError, match=match) as info:
        build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher.d2kd_cfg))
    assert "RetinaNet" in str(info.value), "the error should name the detector that lacks the part"


def test_gkd_on_retinanet_uses_positive_anchors(retina_pair, retina_models):
    """GKD builds on two RetinaNets (response term on the dense head) and one training forward
    (one image without ground truth) gives finite global, feature and response terms."""
    cfg = _heads_cfg(retina_pair, ["gkd"], ["DISTILL.GKD.IN_FEATURES", RETINA_LEVELS])
    student, teacher = retina_models
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher.d2kd_cfg))
    head = heads["gkd"]
    assert head.teacher_parts == {"backbone", "dense"} and "label_anchors" in head.student_methods
    g = torch.Generator().manual_seed(0)
    for level, name in enumerate(head.names):
        s_protos, t_protos, _ = head.prototypes(name)
        for cls in range(3):
            head.set_prototypes(level, cls, torch.randn(s_protos.shape[1:], generator=g), torch.randn(t_protos.shape[1:], generator=g))
    head.prototype_iter.fill_(0)
    model = DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg))
    # The fixture's student and teacher hold the same random weights: shift the teacher's class
    # logits so that the response term on the positive anchors cannot be 0.
    bias = teacher.head.cls_score.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(1.0)
        losses = step(model, synthetic_batch())
    finally:
        with torch.no_grad():
            bias.copy_(saved)
        model.student_recorder.remove()
        model.teacher_recorder.remove()
    expected = {f"loss_kd_gkd_{kind}_{l}" for l in RETINA_LEVELS for kind in ("global", "feat")} | {"loss_kd_gkd_resp"}
    assert expected <= set(losses), sorted(losses)
    assert all(torch.isfinite(losses[k]) for k in expected), {k: float(losses[k]) for k in expected}
    assert float(losses["loss_kd_gkd_resp"]) > 0
    sum(losses[k] for k in expected).backward()
    assert any(p.grad is not None for p in student.head.parameters())
    student.zero_grad(set_to_none=True)


def test_gkd_mixed_pair_needs_the_response_term_off(tmp_path, retina_models, teacher_r18_weights):
    """A Faster R-CNN teacher has no dense head: the GKD response term is a build-time error
    naming the fix; the global and feature terms alone work."""
    opts = ["DISTILL.HEADS", ["gkd"], "DISTILL.GKD.IN_FEATURES", ["p3", "p4", "p5", "p6"]]
    cfg = distill_cfg("bccd/distill_fitnet_FRCNN-R50_retinanet-R18.yaml", tmp_path, teacher_r18_weights, opts=opts)
    student, _ = retina_models
    teacher = build_teacher(cfg)
    assert type(teacher).__name__ == "GeneralizedRCNN"
    context = BuildContext(student, teacher, cfg, teacher.d2kd_cfg)
    with pytest.raises(DistillConfigError, match=r"teacher \(GeneralizedRCNN\) has none.*RESPONSE_WEIGHT 0"):
        build_distill_heads(cfg, context)
    cfg.DISTILL.GKD.RESPONSE_WEIGHT = 0.0
    head = build_distill_heads(cfg, context)["gkd"]
    assert head.teacher_parts == {"backbone"} and not head.two_stage


def test_densekd_needs_two_retinanets(tmp_path, retina_r18_weights, teacher_r18_weights):
    # RetinaNet student, Faster R-CNN teacher (and the reverse): a clear error while building.
    for config, weights, teacher_config, role in (
        ("bccd/distill_densekd_retinanet_R50_R18.yaml", teacher_r18_weights, "bccd/student_R18_FPN.yaml", "teacher"),
        ("bccd/distill_kd_R50_R18.yaml", retina_r18_weights, RETINA_STUDENT, "student"),
    ):
        cfg = distill_cfg(config, tmp_path / role, weights, teacher_config=teacher_config, opts=["DISTILL.HEADS", ["densekd"]])
        with pytest.raises(DistillConfigError, match=f"the {role} .* has none"):
            DistillTrainer(cfg)


# Feature heads on RetinaNet levels p3..p7: (head, its RetinaNet config or None, options).
FEATURE_HEADS = [
    ("fitnet", "bccd/distill_fitnet_retinanet_R50_R18.yaml", []),
    ("cwd", "bccd/distill_cwd_retinanet_R50_R18.yaml", []),
    ("fgd", "bccd/distill_fgd_retinanet_R50_R18.yaml", []),
    ("fgfi", "bccd/distill_fgfi_retinanet_R50_R18.yaml", ["DISTILL.FGFI.WARMUP_ITERS", 0]),
    ("defeat", "bccd/distill_defeat_retinanet_R50_R18.yaml", []),
    ("fbkd", None, ["DISTILL.FBKD.IN_FEATURES", RETINA_LEVELS]),
    ("hgd", None, ["DISTILL.HGD.IN_FEATURES", ["res3", "res4", "res5"] + RETINA_LEVELS]),
    (
        "chen2017",
        None,
        ["DISTILL.CHEN2017.CLS.ENABLED", False, "DISTILL.CHEN2017.REG.ENABLED", False, "DISTILL.CHEN2017.HINT.IN_FEATURES", RETINA_LEVELS],
    ),
]


@pytest.mark.parametrize("head,config,opts", FEATURE_HEADS, ids=[h for h, _, _ in FEATURE_HEADS])
def test_feature_heads_on_retinanet_levels(tmp_path, retina_r18_weights, retina_models, head, config, opts):
    """One training forward on RetinaNet p3..p7 (one image without ground truth): finite terms."""
    if head.lower() not in {n.lower() for n, _ in DISTILL_HEAD_REGISTRY}:
        pytest.skip(f"head {head} is not registered yet")
    config = config or "bccd/distill_fitnet_retinanet_R50_R18.yaml"
    cfg = distill_cfg(config, tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT, opts=opts)
    cfg.DISTILL.HEADS = [head, "densekd"]
    student, teacher = retina_models
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher.d2kd_cfg))
    model = DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg))
    try:
        losses = step(model, synthetic_batch())
    finally:
        model.student_recorder.remove()
        model.teacher_recorder.remove()
    kd = {k: v for k, v in losses.items() if k.startswith(f"loss_kd_{head}")}
    assert kd, f"{head} returned no term: {sorted(losses)}"
    assert all(torch.isfinite(v).all() for v in losses.values()), {k: float(v) for k, v in losses.items()}
    assert all(f"loss_kd_densekd_{l}" in losses for l in RETINA_LEVELS)
    sum(v for v in kd.values()).backward()  # the student side gets gradients
    assert any(p.grad is not None for p in student.backbone.parameters())
    student.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# Heterogeneous pairs
# ---------------------------------------------------------------------------------------


def test_faster_rcnn_teacher_distils_retinanet_student(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_fitnet_FRCNN-R50_retinanet-R18.yaml", tmp_path, teacher_r18_weights)
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    trainer = train(cfg)
    assert type(trainer.teacher).__name__ == "GeneralizedRCNN"
    assert_logged_and_finite(trainer, ["loss_cls"] + [f"loss_kd_fitnet_{l}" for l in ("p3", "p4", "p5", "p6")])
    assert sorted(trainer.model.teacher_runner.parts) == ["backbone"]


def test_fpn_256_teacher_distils_fpn_128_student(tmp_path):
    teacher_cfg = load_test_cfg("bccd/teacher_R50_FPN256.yaml", tmp_path)
    assert teacher_cfg.MODEL.FPN.OUT_CHANNELS == 256 and teacher_cfg.MODEL.RESNETS.DEPTH == 50
    # The R18 architecture with a 256-channel FPN stands in for the R50 teacher (cheaper).
    wide = ["MODEL.FPN.OUT_CHANNELS", 256]
    (tmp_path / "wide").mkdir()
    weights = save_random_checkpoint("bccd/student_R18_FPN.yaml", str(tmp_path / "wide" / "teacher.pth"), opts=wide)
    cfg = distill_cfg("bccd/distill_fitnet_R50-FPN256_R18.yaml", tmp_path / "run", weights)
    cfg.DISTILL.TEACHER.OPTS = cfg.DISTILL.TEACHER.OPTS + wide
    trainer = train(cfg)
    adapters = trainer.heads["fitnet"].pairing.adapters
    assert all((a.conv.in_channels, a.conv.out_channels) == (128, 256) for a in adapters.values())
    assert_logged_and_finite(trainer, ["loss_kd_kd"] + [f"loss_kd_fitnet_p{i}" for i in range(2, 7)])


def test_low_resolution_student_teacher_at_twice_the_resolution(tmp_path, teacher_r18_weights):
    """INPUT_SCALE 2: teacher input, feature correspondence and RoI boxes end to end."""
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18_lowres.yaml", tmp_path, teacher_r18_weights)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96  # half of the tests' 128/192
    assert cfg.DISTILL.TEACHER.INPUT_SCALE == 2.0
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    student, teacher = trainer.student, trainer.teacher
    seen = _Inputs(
        student_backbone=student.backbone,
        teacher_backbone=teacher.backbone,
        student_pooler=student.roi_heads.box_pooler,
        teacher_pooler=teacher.roi_heads.box_pooler,
    )
    pairs = []
    pairing = trainer.heads["fitnet"].pairing
    original_pairs = pairing.pairs
    pairing.pairs = lambda s, t: pairs.append(original_pairs(s, t)) or pairs[-1]
    try:
        trainer.train()
    finally:
        seen.remove()
    assert_logged_and_finite(trainer, ["loss_kd_kd"] + [f"loss_kd_fitnet_p{i}" for i in range(2, 7)])
    for (s_in,), (t_in,) in zip(seen.data["student_backbone"], seen.data["teacher_backbone"]):
        assert s_in.shape[-2] == 64 and t_in.shape[-2] == 128  # short sides: student 64, teacher 128
        assert t_in.shape[-1] >= 2 * s_in.shape[-1] - 32
    # The teacher's box head gets the student's sampled RoIs, scaled to its resolution.
    assert len(seen.data["teacher_pooler"]) == 2
    for (_, s_boxes), (_, t_boxes) in zip(seen.data["student_pooler"], seen.data["teacher_pooler"]):
        for s, t in zip(s_boxes, t_boxes):
            assert len(s) > 0
            torch.testing.assert_close(t.tensor, 2 * s.tensor)
    # Every pair compares maps of equal size covering the same image extent.
    for name, adapted, target, raw in pairs[-1]:
        assert adapted.shape == target.shape
        cells = pairing.student_strides[name] / pairing.target_strides[name]
        assert cells == 2.0
        assert target.shape[-1] <= round(raw.shape[-1] * cells) and target.shape[-2] <= round(raw.shape[-2] * cells)


class _FakeFPN(nn.Module):
    def output_shape(self):
        return {"p3": ShapeSpec(channels=2, stride=8), "p6": ShapeSpec(channels=2, stride=64)}


class _FakeDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _FakeFPN()


def _centres(height, width, stride, scale=1.0):
    """A 2-channel map holding the (x, y) centre of every cell in STUDENT image pixels."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride / scale
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride / scale
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)])[None]


def test_feature_pairs_correspond_when_teacher_and_student_pad_differently():
    """
    Student image 96 x 200 px, padded to 96 x 224; the teacher sees it at 2x (192 x 400),
    padded to 192 x 416 -- not 2 x 224. Each cell of a paired map must describe the same
    image location: student cell centres resized to the teacher grid equal the teacher's.
    """
    pairing = FeaturePairing(_FakeDetector(), _FakeDetector(), ["p3", "p6"], teacher_input_scale=2.0, adapter_enabled=False)
    student = {"p3": _centres(12, 28, 8), "p6": _centres(2, 4, 64)}  # 96 x 224 padded; p6 = ceil(p5 / 2)
    teacher = {"p3": _centres(24, 52, 8, 2.0), "p6": _centres(3, 7, 64, 2.0)}  # 192 x 416 padded
    s_records = Records({"backbone": [((None,), student)]})
    t_records = Records({"backbone": [((None,), teacher)]})
    for name, adapted, target, raw in pairing.pairs(s_records, t_records):
        assert adapted.shape == target.shape
        # Bilinear resizing is exact on a linear ramp, away from the student map's edges (clamped).
        torch.testing.assert_close(adapted[..., 1:-1, 1:-1], target[..., 1:-1, 1:-1], msg=name)
    # The pre-fix behaviour (student map stretched over the teacher's padded extent) is off by
    # up to 2 student cells at the right edge of p3 here: the check above can fail.
    stretched = torch.nn.functional.interpolate(student["p3"], size=(24, 52), mode="bilinear", align_corners=False)
    assert (stretched - teacher["p3"])[..., 1:-1, 1:-1].abs().max() > 8


def test_each_model_gets_its_own_format_and_normalisation(tmp_path, teacher_r18_weights):
    """An RGB, ImageNet-std student and a BGR, std-1 (model-zoo style) teacher."""
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=IMAGENET_RGB)
    bgr_std1 = ["MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675], "MODEL.PIXEL_STD", [1.0, 1.0, 1.0], "INPUT.FORMAT", "BGR"]
    cfg.DISTILL.TEACHER.OPTS = cfg.DISTILL.TEACHER.OPTS + bgr_std1
    model = build_distiller(cfg)
    student, teacher = model.student, model.teacher
    assert (student.input_format, teacher.input_format) == ("RGB", "BGR")
    batch = synthetic_batch(sizes=((100, 120),), empty=())
    image = batch[0]["image"].float()
    seen = _Inputs(student=student.backbone, teacher=teacher.backbone)
    try:
        step(model, batch)
    finally:
        seen.remove()
    (s_in,), (t_in,) = seen.data["student"][0], seen.data["teacher"][0]
    assert s_in.shape == t_in.shape == (1, 3, 128, 128)  # padded to 32
    rgb_mean, rgb_std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    bgr_mean = torch.tensor([103.53, 116.28, 123.675])
    expected_student = (image - rgb_mean[:, None, None]) / rgb_std[:, None, None]
    expected_teacher = image.flip(0) - bgr_mean[:, None, None]  # RGB -> BGR, std 1
    torch.testing.assert_close(s_in[0, :, :100, :120], expected_student)
    torch.testing.assert_close(t_in[0, :, :100, :120], expected_teacher)
    assert not t_in[0, :, 100:, :].any() and not t_in[0, :, :, 120:].any()  # zero padding


# ---------------------------------------------------------------------------------------
# Student backbone swap: MobileNetV2-FPN
# ---------------------------------------------------------------------------------------


def test_mobilenet_v2_student_from_torchvision_weights(tmp_path, teacher_r18_weights):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2(weights=None)
    for m in reference.modules():  # non-trivial statistics, so loading is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    weights = str(tmp_path / "mobilenet_v2.pth")
    torch.save(reference.state_dict(), weights)

    opts = ["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", weights] + IMAGENET_RGB
    cfg = distill_cfg("bccd/distill_fitnet_R50_MNV2.yaml", tmp_path / "run", teacher_r18_weights, opts=opts)
    assert list(cfg.DISTILL.HEADS) == ["fitnet", "kd"]
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    bottom_up = trainer.student.backbone.bottom_up
    shapes = bottom_up.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert {k: v.channels for k, v in shapes.items()} == {"res2": 24, "res3": 32, "res4": 96, "res5": 320}
    own = bottom_up.state_dict()
    for key in ("features.0.0.weight", "features.5.conv.1.0.weight", "features.17.conv.3.running_mean", "features.17.conv.3.running_var"):
        torch.testing.assert_close(own[key], reference.state_dict()[key], msg=key)
    trainer.train()
    assert_logged_and_finite(trainer, ["loss_kd_kd"] + [f"loss_kd_fitnet_p{i}" for i in range(2, 7)])
    # FrozenBN statistics stay the ImageNet ones.
    key = "features.17.conv.3.running_mean"
    torch.testing.assert_close(bottom_up.state_dict()[key], reference.state_dict()[key])


def test_mobilenet_v2_retinanet_student(tmp_path, retina_r18_weights):
    """The RetinaNet builder of the swapped backbone (p3..p7) under the RetinaNet teacher."""
    opts = ["MODEL.BACKBONE.NAME", "build_mobilenetv2_retinanet_fpn_backbone", "DISTILL.HEADS", ["fitnet", "densekd"]]
    cfg = distill_cfg("bccd/distill_fitnet_retinanet_R50_R18.yaml", tmp_path, retina_r18_weights, teacher_config=RETINA_STUDENT, opts=opts)
    model = build_distiller(cfg)
    assert sorted(model.student.backbone.output_shape()) == RETINA_LEVELS
    losses = step(model, synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert {f"loss_kd_{h}_{l}" for h in ("fitnet", "densekd") for l in RETINA_LEVELS} <= set(losses)


def test_mobilenet_v2_bad_weights_are_clear_errors(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.pth"))
    for opts, match in (
        (["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", str(tmp_path / "other.pth")], "not a torchvision MobileNetV2"),
        (["MODEL.MOBILENET.NORM", "FrozenBN", "MODEL.MOBILENET.WEIGHTS", str(tmp_path / "nope.pth")], "not found"),
        (["MODEL.MOBILENET.WEIGHTS", str(tmp_path / "other.pth")], "NORM"),  # GN cannot hold BN statistics
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            build_model(load_test_cfg("bccd/student_MNV2_FPN.yaml", tmp_path, opts))


# ---------------------------------------------------------------------------------------
# Mask R-CNN student
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mask_dataset():
    """4 BCCD images whose boxes get box-shaped polygon masks (BCCD has none)."""
    name = "bccd_tiny_box_masks"
    if name not in DatasetCatalog.list():
        records = copy.deepcopy(DatasetCatalog.get("bccd_trainval")[:4])
        for record in records:
            for ann in record["annotations"]:
                x0, y0, x1, y1 = ann["bbox"]  # XYXY_ABS in the BCCD loader
                ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        DatasetCatalog.register(name, lambda: copy.deepcopy(records))
        MetadataCatalog.get(name).set(thing_classes=list(MetadataCatalog.get("bccd_trainval").thing_classes))
    return name


def test_mask_rcnn_student_keeps_its_mask_head_training(tmp_path, teacher_r18_weights, tiny_mask_dataset):
    opts = ["MODEL.MASK_ON", True, "DATASETS.TRAIN", (tiny_mask_dataset,), "DISTILL.HEADS", ["fitnet", "kd"]]
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=opts)
    trainer = train(cfg)
    assert trainer.student.roi_heads.mask_on and not hasattr(trainer.teacher.roi_heads, "mask_head")
    assert_logged_and_finite(trainer, ["loss_mask", "loss_cls", "loss_kd_kd", "loss_kd_fitnet_p2"])


# ---------------------------------------------------------------------------------------
# Model-zoo teachers by name (real R101 configs, random weights saved to a checkpoint)
# ---------------------------------------------------------------------------------------

ZOO_SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192, "DATASETS.TRAIN", ("bccd_trainval",)]
ZOO_CASES = {
    # zoo config: (student distillation config, teacher OPTS, heads and their options, expected terms)
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml": (
        "bccd/distill_fitnet_zoo-R101_MNV2.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["fitnet", "kd"]],
        ["loss_kd_kd", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"],
    ),
    "COCO-Detection/retinanet_R_101_FPN_3x.yaml": (
        "bccd/distill_densekd_retinanet_R50_R18.yaml",
        ["MODEL.RETINANET.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["densekd", "fitnet"], "DISTILL.FITNET.IN_FEATURES", RETINA_LEVELS],
        ["loss_kd_densekd_p3", "loss_kd_densekd_p7", "loss_kd_fitnet_p3", "loss_kd_fitnet_p7"],
    ),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml": (
        "bccd/distill_kd_R50_R18.yaml",
        ["MODEL.ROI_HEADS.NUM_CLASSES", 3],
        ["DISTILL.HEADS", ["fitnet", "kd"]],
        ["loss_kd_kd", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"],
    ),
}


@pytest.mark.parametrize("zoo_name", list(ZOO_CASES))
def test_model_zoo_teacher_by_name(tmp_path, zoo_name):
    config, teacher_opts, head_opts, expected = ZOO_CASES[zoo_name]
    opts = ["DISTILL.TEACHER.CONFIG_FILE", zoo_name, "DISTILL.TEACHER.WEIGHTS", str(tmp_path / "zoo" / "model.pth")]
    cfg = load_test_cfg(config, tmp_path, opts + head_opts, max_iter=1)
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        # densekd compares anchor by anchor: give the teacher the student's (BCCD) anchor sizes,
        # 9 per cell as its weights expect.
        teacher_opts = teacher_opts + ["MODEL.ANCHOR_GENERATOR.SIZES", [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]]
    cfg.DISTILL.TEACHER.OPTS = ZOO_SMALL_INPUT + teacher_opts
    if cfg.MODEL.MOBILENET.WEIGHTS:  # the ImageNet-initialised MobileNetV2 student
        import torchvision

        cfg.MODEL.MOBILENET.WEIGHTS = str(tmp_path / "mobilenet_v2.pth")
        torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), cfg.MODEL.MOBILENET.WEIGHTS)
    # Save random weights of the zoo architecture (a stand-in for the downloaded model_final).
    teacher_cfg = build_teacher_cfg(cfg)
    assert teacher_cfg.MODEL.RESNETS.DEPTH == 101 and teacher_cfg.MODEL.FPN.OUT_CHANNELS == 256
    teacher = build_model(teacher_cfg)
    (tmp_path / "zoo").mkdir()
    DetectionCheckpointer(teacher, save_dir=str(tmp_path / "zoo")).save("model")
    del teacher

    trainer = train(cfg)
    assert trainer.teacher.backbone.bottom_up.stages[2].__len__() == 23  # R101: 23 blocks in res4
    assert trainer.teacher.input_format == "BGR" and torch.all(trainer.teacher.pixel_std == 1)
    assert_logged_and_finite(trainer, expected)


# ---------------------------------------------------------------------------------------
# The custom-backbone guide's example (docs/custom_backbone.md), executed
# ---------------------------------------------------------------------------------------


def test_custom_backbone_guide_example(tmp_path, teacher_r18_weights):
    import re
    import types

    from detectron2.modeling import BACKBONE_REGISTRY

    guide = open(os.path.join(os.path.dirname(CONFIGS), "docs", "custom_backbone.md")).read()
    code = re.findall(r"```python\n(.*?)```", guide, re.S)[0]
    if "build_tinynet_fpn_backbone" not in BACKBONE_REGISTRY:
        exec(compile(code, "docs/custom_backbone.md", "exec"), types.ModuleType("my_backbone").__dict__)
    # The guide's YAML, as options on the same base config.
    yaml_opts = ["MODEL.BACKBONE.NAME", "build_tinynet_fpn_backbone", "MODEL.TINYNET.WIDTH", 32, "DISTILL.HEADS", ["fitnet", "kd"]]
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=yaml_opts)
    assert "TINYNET" in build_teacher_cfg(cfg).MODEL  # the teacher's config carries the keys too
    model = build_distiller(cfg)
    assert type(model.student.backbone.bottom_up).__name__ == "TinyNet"
    adapters = model.heads["fitnet"].pairing.adapters
    assert sorted(adapters) == ["p2", "p3", "p4", "p5", "p6"]
    losses = step(model, synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_kd_kd" in losses and "loss_kd_fitnet_p2" in losses
