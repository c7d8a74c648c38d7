"""
Every built-in head is ``@configurable``: built from a config (``Head(cfg, context)``, what
``build_distill_heads`` does) and from explicit arguments, it records the same modules, asks
the teacher for the same parts and returns the same loss terms on the same inputs. A user's
head written the same way is built by ``build_distill_heads``, and the RoI mixin checks its models.
"""

import inspect

import pytest
import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from d2kd import get_distill_cfg
from d2kd.capture import Records
from d2kd.heads import DISTILL_HEAD_REGISTRY, BuildContext, DistillConfigError, DistillHead, build_distill_heads
from d2kd.heads.base import detector_levels
from d2kd.heads.chen2017 import Chen2017
from d2kd.heads.cwd import CWD
from d2kd.heads.defeat import DeFeat
from d2kd.heads.dense_kd import DenseKD
from d2kd.heads.fbkd import FBKD
from d2kd.heads.feature_imitation import FeatureImitationHead
from d2kd.heads.fgd import FGD
from d2kd.heads.fgfi import FGFI
from d2kd.heads.fitnet import FitNet
from d2kd.heads.gkd import GKD
from d2kd.heads.hgd import HGD
from d2kd.heads.hgd.stage_matching import match_stages
from d2kd.heads.kd import KD
from d2kd.heads.roi_logits import RoILogitsMixin
from d2kd.modeling.feature_pairs import FeaturePairing, add_feature_pairing_config
from conftest import fake_fpn_context, head_step_terms, load_test_cfg

RCNN = "bccd/student_R18_FPN.yaml"
RETINANET = "bccd/retinanet_R18_FPN_student.yaml"
P2_P6 = ["p2", "p3", "p4", "p5", "p6"]
P2_P5 = ["p2", "p3", "p4", "p5"]


def _models(config, tmp_path, opts=()):
    """A config (DISTILL options at their defaults unless ``opts``) and two random models of it."""
    cfg = load_test_cfg(config, tmp_path, opts)
    torch.manual_seed(0)
    student = build_model(cfg)
    torch.manual_seed(1)
    teacher = build_model(cfg)
    return cfg, student, teacher






def _declared(head):
    return (
        list(head.student_modules),
        list(head.student_methods),
        list(head.teacher_modules),
        list(head.teacher_methods),
        set(head.teacher_parts),
    )


def _assert_same_head(from_cfg, explicit, student, teacher):
    """Same type, captures, parameters/buffers (copied over) and loss terms."""
    assert type(explicit) is type(from_cfg) and explicit.name == from_cfg.name
    assert _declared(explicit) == _declared(from_cfg)
    explicit.load_state_dict(from_cfg.state_dict())  # strict: the same parameters and buffers
    expected = head_step_terms(student, teacher, from_cfg)
    got = head_step_terms(student, teacher, explicit)
    assert expected and set(got) == set(expected)
    for key in expected:
        assert torch.isfinite(expected[key]), key
        torch.testing.assert_close(got[key], expected[key], msg=key)


def _from_cfg(head_class, cfg, student, teacher, opts=()):
    cfg = cfg.clone()
    cfg.merge_from_list(list(opts))
    torch.manual_seed(7)
    return head_class(cfg, BuildContext(student, teacher, cfg, cfg))


def _explicit(head_class, **kwargs):
    torch.manual_seed(7)
    return head_class(**kwargs)


# ---------------------------------------------------------------------------- feature heads
def test_fitnet(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(FitNet, cfg, s, t)
    b = _explicit(FitNet, pairing=FeaturePairing(s, t, P2_P6), weight=1.0)
    _assert_same_head(a, b, s, t)


def test_cwd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(CWD, cfg, s, t)
    # Equal channels: the config builds no adapter; explicitly, that is the caller's choice.
    b = _explicit(CWD, pairing=FeaturePairing(s, t, P2_P6, adapter_enabled=False), weight=10.0, tau=1.0)
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.CWD.TAU must be > 0, got 0"):
        CWD(pairing=FeaturePairing(s, t, ["p2"]), tau=0)


def test_fgd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(FGD, cfg, s, t)
    b = _explicit(FGD, pairing=FeaturePairing(s, t, P2_P5, adapter_enabled=False))
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.FGD.BOX_SCALE 'pixels' is unknown"):
        FGD(pairing=FeaturePairing(s, t, ["p2"]), box_scale="pixels")


def test_fbkd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(FBKD, cfg, s, t)
    b = _explicit(FBKD, pairing=FeaturePairing(s, t, P2_P6))
    _assert_same_head(a, b, s, t)
    opts = ["DISTILL.FBKD.FORM", "paper", "DISTILL.FBKD.NLD.INNER_CHANNELS", [8, 8], "DISTILL.FBKD.IN_FEATURES", ["p3", "p4"]]
    a = _from_cfg(FBKD, cfg, s, t, opts)
    b = _explicit(FBKD, pairing=FeaturePairing(s, t, ["p3", "p4"]), form="paper", nld_inner_channels=[8, 8])
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.FBKD.NLD.POOL_STRIDES has 1 entries but IN_FEATURES has 2"):
        FBKD(pairing=FeaturePairing(s, t, ["p3", "p4"]), nld_pool_strides=[2])


def test_fgfi(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(FGFI, cfg, s, t, ["DISTILL.FGFI.WARMUP_ITERS", 0])
    pairing = FeaturePairing(s, t, P2_P6, adapter_kernel=3, adapter_init_std=1e-4, adapter_relu=False)
    b = _explicit(FGFI, student=s, pairing=pairing, warmup_iters=0)
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.FGFI.PSI must be in \(0, 1\], got 0"):
        FGFI(student=s, pairing=pairing, psi=0)


def test_hgd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(HGD, cfg, s, t)
    stages = detector_levels(s, "stages")  # what an empty DISTILL.HGD.IN_FEATURES means
    assert stages == ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]
    b = _explicit(HGD, pairing=FeaturePairing(s, t, stages, match_stages(s, t, stages, "stride", 1.0)))
    assert b.teacher_stages == a.teacher_stages and b.teacher_strides == a.teacher_strides
    _assert_same_head(a, b, s, t)
    opts = ["DISTILL.HGD.IN_FEATURES", ["res4", "p4"], "DISTILL.HGD.MICRO.MODE", "gt", "DISTILL.HGD.MACRO.MODE", "learned"]
    a = _from_cfg(HGD, cfg, s, t, opts)
    pairing = FeaturePairing(s, t, ["res4", "p4"], ["res4", "p4"])
    b = _explicit(HGD, pairing=pairing, micro_mode="gt", macro_mode="learned")
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.HGD.MICRO.MODE must be one of"):
        HGD(pairing=pairing, micro_mode="everywhere")


# ---------------------------------------------------------------------------- heads reading the detectors
def test_kd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    opts = ["DISTILL.KD.TEMPERATURE", 2.0, "DISTILL.KD.WEIGHT", 3.0]
    a = _from_cfg(KD, cfg, s, t, opts)
    b = _explicit(KD, student=s, teacher=t, weight=3.0, temperature=2.0)
    _assert_same_head(a, b, s, t)
    a = _from_cfg(KD, cfg, s, t, ["DISTILL.KD.CLASSIFIER_ONLY", True])
    b = _explicit(KD, student=s, teacher=t, classifier_only=True)
    _assert_same_head(a, b, s, t)
    assert not list(b.parameters()), "the student's cls_score is read, not owned"


def test_defeat(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(DeFeat, cfg, s, t)
    pairing = FeaturePairing(s, t, P2_P6, adapter_kernel=3, adapter_init_std=1e-4)
    b = _explicit(DeFeat, pairing=pairing, roi_kd=True, student=s, teacher=t)
    _assert_same_head(a, b, s, t)
    # Neck part off: no pairing.
    a = _from_cfg(DeFeat, cfg, s, t, ["DISTILL.DEFEAT.NECK_KD", False])
    b = _explicit(DeFeat, pairing=None, student=s, teacher=t)
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"NECK_KD and DISTILL.DEFEAT.ROI_KD are both False"):
        DeFeat(pairing=None, roi_kd=False)


def test_chen2017(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    a = _from_cfg(Chen2017, cfg, s, t)
    b = _explicit(Chen2017, student=s, teacher=t, hint_pairing=FeaturePairing(s, t, P2_P5))
    _assert_same_head(a, b, s, t)
    opts = ["DISTILL.CHEN2017.STAGES", ["rcn"], "DISTILL.CHEN2017.HINT.ENABLED", False, "DISTILL.CHEN2017.REG.MODE", "l2"]
    a = _from_cfg(Chen2017, cfg, s, t, opts)
    b = _explicit(Chen2017, student=s, teacher=t, stages=["rcn"], reg_mode="l2")
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"DISTILL.CHEN2017.CLS.MU must be in \[0, 1\]"):
        Chen2017(student=s, teacher=t, mu=2.0)


def test_chen2017_checks_the_detectors_before_the_hint_features(tmp_path):
    """A RetinaNet (no RPN; its default hint levels are its own p3..p7) is reported as a model without an RPN."""
    cfg, s, t = _models(RETINANET, tmp_path)
    with pytest.raises(DistillConfigError, match=r"distils the RPN, but the student \(RetinaNet\)"):
        _from_cfg(Chen2017, cfg, s, t)


def test_gkd(tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)

    def with_prototypes(head):
        g = torch.Generator().manual_seed(3)
        for level, name in enumerate(head.names):
            ps, pt, _ = head.prototypes(name)
            for c in range(head.num_classes):
                head.set_prototypes(level, c, torch.randn(ps.shape[1:], generator=g), torch.randn(pt.shape[1:], generator=g))
        head.prototype_iter.fill_(0)
        return head

    a = with_prototypes(_from_cfg(GKD, cfg, s, t))
    classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    pairing = FeaturePairing(s, t, P2_P6, adapter_kernel=3)
    b = _explicit(GKD, student=s, teacher=t, pairing=pairing, max_iter=cfg.SOLVER.MAX_ITER, class_names=classes)
    assert b.class_names == a.class_names and dict(b.pgm_options) == dict(a.pgm_options)
    _assert_same_head(a, b, s, t)
    opts = ["DISTILL.GKD.PGM.NUM_PROTOTYPES", 3, "DISTILL.GKD.FEATURE_WEIGHT", 0.0, "DISTILL.GKD.LINEAR_DECAY", True]
    a = with_prototypes(_from_cfg(GKD, cfg, s, t, opts))
    b = _explicit(
        GKD,
        student=s,
        teacher=t,
        pairing=FeaturePairing(s, t, P2_P6, adapter_kernel=3),
        feature_weight=0.0,
        linear_decay=True,
        max_iter=cfg.SOLVER.MAX_ITER,
        pgm={"NUM_PROTOTYPES": 3},
    )
    assert b.class_names == ["class 0", "class 1", "class 2"] and not list(b.pairing.adapters)
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"Invalid DISTILL.GKD options: PGM.NUM_PROTOTYPES must be >= 1"):
        GKD(student=s, teacher=t, pairing=pairing, pgm={"NUM_PROTOTYPES": 0})


def test_dense_kd(tmp_path):
    cfg, s, t = _models(RETINANET, tmp_path)
    opts = ["DISTILL.DENSEKD.TEMPERATURE", 2.0, "DISTILL.DENSEKD.FOCAL_GAMMA", 1.0]
    a = _from_cfg(DenseKD, cfg, s, t, opts)
    b = _explicit(DenseKD, student=s, teacher=t, temperature=2.0, focal_gamma=1.0)
    _assert_same_head(a, b, s, t)
    with pytest.raises(DistillConfigError, match=r"Invalid DISTILL.DENSEKD options: FORM must be one of"):
        DenseKD(student=s, teacher=t, form="js")


# ---------------------------------------------------------------------------- a user's heads
class UserHead(DistillHead):
    """A user's head as docs/usage.md shows it: ``@configurable`` with ``from_config``."""

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.USERHEAD = CN({"WEIGHT": 2.0})

    @configurable
    def __init__(self, *, weight: float = 2.0, channels: int):
        super().__init__()
        self.weight = weight
        self.channels = channels
        self.student_modules = ["backbone"]
        self.teacher_modules = ["backbone"]
        self.teacher_parts = {"backbone"}

    @classmethod
    def from_config(cls, cfg, context):
        return {"weight": cls.options(cfg).WEIGHT, "channels": context.student.backbone.channels}

    def forward(self, student, teacher, step):
        s, t = student.output("backbone")["p2"], teacher.output("backbone")["p2"]
        return {"p2": self.weight * (s - t).pow(2).mean()}


class UserRoIHead(RoILogitsMixin, DistillHead):
    """A user's head on the RoI logits: the mixin checks the two models it is given."""

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.USERROIHEAD = CN({"WEIGHT": 1.0})

    @configurable
    def __init__(self, *, student, teacher):
        super().__init__()
        self._require_roi_logits(student, teacher)

    @classmethod
    def from_config(cls, cfg, context):
        return {"student": context.student, "teacher": context.teacher}

    def forward(self, student, teacher, step):
        return {}


@pytest.fixture
def user_heads():
    from d2kd.config import defaults

    for head in (UserHead, UserRoIHead):
        DISTILL_HEAD_REGISTRY.register(head)
    try:
        yield
    finally:
        for head in (UserHead, UserRoIHead):
            DISTILL_HEAD_REGISTRY._obj_map.pop(head.__name__)
            defaults._CONFIG_EXTENSIONS.remove(head.add_config)


def test_user_head_is_built_by_build_distill_heads(user_heads):
    cfg = get_distill_cfg()
    cfg.DISTILL.HEADS = ["UserHead", "FitNet"]
    cfg.DISTILL.USERHEAD.WEIGHT = 3.0
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2"]
    heads = build_distill_heads(cfg, fake_fpn_context(4, 4))
    assert list(heads) == ["userhead", "fitnet"]
    head = heads["userhead"]
    assert head.weight == 3.0 and head.channels == 4
    assert head.student_modules == ["backbone"] and head.teacher_parts == {"backbone"} and head.student_methods == []
    s, t = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    out = head(Records({"backbone": [((), {"p2": s})]}), Records({"backbone": [((), {"p2": t})]}), None)
    assert out["p2"].item() == pytest.approx(3.0)


def test_user_head_with_the_roi_mixin(user_heads, tmp_path):
    cfg, s, t = _models(RCNN, tmp_path)
    cfg.DISTILL.HEADS = ["UserRoIHead"]
    head = build_distill_heads(cfg, BuildContext(s, t, cfg, cfg))["userroihead"]
    assert head.teacher_parts == {"roi_box"} and head.student_methods == ["roi_heads.label_and_sample_proposals"]
    with pytest.raises(DistillConfigError, match=r"Head 'userroihead' distils the RoI box head"):
        build_distill_heads(cfg, fake_fpn_context(4, 4))


def test_distill_head_needs_no_argument():
    head = DistillHead()
    assert head.name == "distillhead" and head.student_modules == [] and head.teacher_parts == set()
    with pytest.raises(TypeError):
        DistillHead(get_distill_cfg(), None)  # one way to build a head: @configurable


class UserL1Hint(FeatureImitationHead):
    """A new FPN method: its options and its loss, nothing else (the FeatureImitationHead docstring)."""

    @classmethod
    def add_config(cls, cfg):
        cfg.DISTILL.USERL1HINT = CN({"WEIGHT": 1.0})
        add_feature_pairing_config(cfg.DISTILL.USERL1HINT)

    def level_loss(self, level, adapted, target):
        return (adapted - target.detach()).abs().mean()


def test_feature_imitation_head_is_its_loss_plus_its_options():
    from d2kd.config import defaults

    DISTILL_HEAD_REGISTRY.register(UserL1Hint)
    try:
        cfg = get_distill_cfg()
        cfg.DISTILL.HEADS = ["UserL1Hint"]
        cfg.DISTILL.USERL1HINT.IN_FEATURES = ["p2", "p3"]
        cfg.DISTILL.USERL1HINT.WEIGHT = 0.5
        cfg.DISTILL.USERL1HINT.ADAPTER.ENABLED = False
        head = build_distill_heads(cfg, fake_fpn_context(2, 2))["userl1hint"]
    finally:
        DISTILL_HEAD_REGISTRY._obj_map.pop("UserL1Hint")
        defaults._CONFIG_EXTENSIONS.remove(UserL1Hint.add_config)
    assert head.weight == 0.5 and head.pairing.names == ["p2", "p3"] and not list(head.parameters())
    assert head.student_modules == ["backbone"] and head.teacher_modules == ["backbone"]
    assert head.teacher_parts == {"backbone"}
    s = {"p2": torch.full((1, 2, 4, 4), 3.0), "p3": torch.full((1, 2, 2, 2), -1.0)}
    t = {"p2": torch.ones(1, 2, 4, 4), "p3": torch.ones(1, 2, 2, 2)}
    out = head(Records({"backbone": [((), s)]}), Records({"backbone": [((), t)]}), None)
    assert set(out) == {"p2", "p3"}
    assert out["p2"].item() == pytest.approx(0.5 * 2.0) and out["p3"].item() == pytest.approx(0.5 * 2.0)


def test_built_in_heads_are_configurable():
    """``Head(cfg, context)`` goes through ``from_config``; every built-in head has one (its own
    or, for the FPN feature-imitation heads, FeatureImitationHead's)."""
    for name, head_class in DISTILL_HEAD_REGISTRY:
        if head_class.__module__.startswith("d2kd.heads"):
            assert isinstance(inspect.getattr_static(head_class, "from_config", None), classmethod), name
            assert hasattr(head_class.__init__, "__wrapped__"), f"{name}.__init__ is not @configurable"
