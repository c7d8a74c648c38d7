"""d2kd.capture: the Recorder's hooks on toy models; missing capture targets are named with nearby modules."""

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from d2kd import DistillTrainer
from d2kd.capture import CaptureTargetError, Recorder
from d2kd.heads import DistillHead
from d2kd.modeling.distiller import DistillationModel
from d2kd.modeling.schedule import DistillSchedule

from conftest import distill_cfg, load_test_cfg


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        self.shared = nn.Linear(3, 1)

    def pick(self, x):
        return x * 2

    def forward(self, x):
        h = self.body(x)
        return self.shared(h) + self.shared(h * 0) + self.pick(h).sum()


def test_records_only_inside_recording_and_clears_each_step():
    model = Toy()
    rec = Recorder(model, ["body", "shared"], ["pick"], role="student")
    x = torch.randn(4, 2)
    model(x)  # outside recording: nothing kept
    assert "body" not in rec.pop()
    with rec.recording():
        model(x)
    records = rec.pop()
    torch.testing.assert_close(records.output("body"), model.body(x))
    assert len(records.outputs("shared")) == 2, "a module called twice yields two records"
    with pytest.raises(RuntimeError, match="ran 2 times"):
        records.output("shared")
    torch.testing.assert_close(records.output("pick"), model.body(x) * 2)
    with rec.recording():
        model(x[:1])
    assert records is not rec.pop()
    with rec.recording():
        pass
    assert "body" not in rec.pop(), "buffers are cleared at each step"


def test_missing_targets_name_nearby_modules():
    model = Toy()
    with pytest.raises(CaptureTargetError) as err:
        Recorder(model, ["bodyy"], role="teacher")
    assert "teacher" in str(err.value) and "body" in str(err.value)
    with pytest.raises(CaptureTargetError, match="has no method 'nope'"):
        Recorder(model, [], ["body.nope"])
    with pytest.raises(KeyError, match="Nothing was recorded for 'shared'"):
        Recorder(model, ["body"]).pop().output("shared")


def test_hooks_do_not_change_outputs_or_gradients():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(3, 2)
    expected = model(x)
    rec = Recorder(model, ["body", "shared"], ["pick"])
    with rec.recording():
        out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model.body[0].weight.grad is not None
    assert rec.pop().output("body").requires_grad, "student records keep their graph"


# ---------------------------------------------------------------------------------------
# Capture targets of real detectors
# ---------------------------------------------------------------------------------------


def test_missing_hook_target_names_nearby_modules(tmp_path, teacher_r18_weights):
    from d2kd.capture import Recorder

    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    model = build_model(cfg)
    with pytest.raises(CaptureTargetError, match="backbone.bottom_up"):
        Recorder(model, ["backbone.bottom_upp"], role="student")
    # A head naming a feature the model lacks fails while the trainer is built.
    cfg = distill_cfg(
        "bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=["DISTILL.FITNET.IN_FEATURES", ["p9"]]
    )
    with pytest.raises(KeyError, match="p9.*Available features"):
        DistillTrainer(cfg)


class _BadTargetHead(DistillHead):
    """Not registered: reads a student module that does not exist."""

    def __init__(self):
        super().__init__()
        self.student_modules = ["roi_heads.box_predictorr"]


def test_capture_target_that_does_not_exist_names_nearby_modules(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    student, teacher = build_model(cfg), build_model(cfg)
    head = _BadTargetHead()
    with pytest.raises(CaptureTargetError, match=r"student has no module named 'roi_heads.box_predictorr'.*roi_heads.box_predictor"):
        DistillationModel(student, teacher, torch.nn.ModuleDict({"bad": head}), DistillSchedule())
