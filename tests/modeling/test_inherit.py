"""DISTILL.INHERIT: FGD's inheriting strategy (docs/methods/inherit.md): the student starts from the teacher's neck and heads."""

import pytest
import torch

from d2kd import DistillTrainer
from d2kd.modeling.inherit import InheritError, inherit_teacher_parameters

from conftest import distill_cfg


INHERIT = "bccd/distill_inherit_R50_R18.yaml"
TEACHER = "bccd/teacher_R50_FPN.yaml"


def _teacher_state(weights):
    return torch.load(weights, map_location="cpu", weights_only=False)["model"]


def test_new_run_starts_neck_and_heads_from_the_teacher(tmp_path, teacher_r50_weights):
    cfg = distill_cfg(INHERIT, tmp_path, teacher_r50_weights, teacher_config=TEACHER)
    trainer = DistillTrainer(cfg)
    assert trainer.teacher is not None and len(trainer.heads) == 0  # a teacher, no distillation loss
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.resume_or_load(resume=False)
    after = trainer.student.state_dict()
    teacher = {k: torch.as_tensor(v) for k, v in _teacher_state(teacher_r50_weights).items()}

    inherited = [k for k in after if k.startswith(("backbone.fpn_output", "proposal_generator.", "roi_heads."))]
    assert len(inherited) == 26  # 4 output convs x (conv, GN weight, GN bias), RPN 6, box head 4, predictor 4
    for k in inherited:
        assert torch.equal(after[k], teacher[k]), f"{k} was not taken from the teacher"
        assert not torch.equal(after[k], before[k]) or torch.equal(before[k], teacher[k]), k
    # The lateral convs' weights read R18's narrower stages (another shape): the student's own.
    for level in (2, 3, 4, 5):
        key = f"backbone.fpn_lateral{level}.weight"
        assert after[key].shape != teacher[key].shape and torch.equal(after[key], before[key])
    # The bottom-up network is never inherited, even where a shape agrees (the stem).
    assert after["backbone.bottom_up.stem.conv1.weight"].shape == teacher["backbone.bottom_up.stem.conv1.weight"].shape
    for k in after:
        if k.startswith("backbone.bottom_up.") or k.startswith("pixel_"):
            assert torch.equal(after[k], before[k]), f"{k} changed"


@pytest.mark.train
def test_resumed_run_keeps_its_checkpoint_not_the_teacher(tmp_path, teacher_r50_weights):
    opts = ["SOLVER.CHECKPOINT_PERIOD", 2]
    cfg = distill_cfg(INHERIT, tmp_path, teacher_r50_weights, teacher_config=TEACHER, opts=opts, max_iter=2)
    first = DistillTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    trained = {k: v.clone() for k, v in first.student.state_dict().items()}
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(trained[key], torch.as_tensor(_teacher_state(teacher_r50_weights)[key]))  # it trained

    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 3
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, trained[k]), f"resuming re-inherited {k}"


def test_prefixes_matching_nothing_fail_before_training(tmp_path, teacher_r50_weights):
    opts = ["DISTILL.INHERIT.PREFIXES", ["backbone.fpn_lateral"]]
    cfg = distill_cfg(INHERIT, tmp_path, teacher_r50_weights, teacher_config=TEACHER, opts=opts)
    DistillTrainer(cfg).resume_or_load(resume=False)  # the laterals' GN fit (their convs do not): copied
    cfg.defrost()
    cfg.DISTILL.INHERIT.PREFIXES = ["roi_heads.box_head.fc9", "nope."]
    with pytest.raises(InheritError, match=r"fc9.*matched no tensor.*DISTILL.INHERIT.ENABLED False"):
        DistillTrainer(cfg).resume_or_load(resume=False)
    with pytest.raises(InheritError, match="PREFIXES is empty"):
        inherit_teacher_parameters(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [])


def test_report_lists_what_was_copied_and_what_was_kept():
    def model(extra_inputs):
        return torch.nn.ModuleDict(
            {"head": torch.nn.Linear(3, 2), "extra": torch.nn.Linear(extra_inputs, 2), "body": torch.nn.Linear(2, 2)}
        )

    student, teacher = model(2), model(4)
    body = student["body"].weight.detach().clone()
    report = inherit_teacher_parameters(student, teacher, ["head.", "extra.", "missing."])
    assert report.copied == ["head.weight", "head.bias", "extra.bias"]
    assert report.wrong_shape == ["extra.weight"] and report.not_in_teacher == []
    assert torch.equal(student["head"].weight, teacher["head"].weight)
    assert torch.equal(student["extra"].bias, teacher["extra"].bias)
    assert not torch.equal(student["extra"].weight[:, :2], teacher["extra"].weight[:, :2])
    assert torch.equal(student["body"].weight, body)  # outside the prefixes
    assert student["head"].weight.requires_grad  # still a trainable parameter


@pytest.mark.train
def test_check_reports_the_inheriting_and_its_errors(tmp_path, teacher_r50_weights, capsys):
    from d2kd.engine.check import run_check

    cfg = distill_cfg(INHERIT, tmp_path, teacher_r50_weights, teacher_config=TEACHER)
    report = run_check(cfg, num_images=0)
    assert report.ok, report.errors
    out = capsys.readouterr().out
    assert "DISTILL.INHERIT: copied 34 tensors from the teacher; kept the student's own 4 of another shape" in out
    assert f"teacher: {cfg.DISTILL.TEACHER.CONFIG_FILE} with weights {teacher_r50_weights}" in out
    assert "teacher AP not measured" in out  # it would be with --check-images > 0: a random teacher warns
    cfg.defrost()
    cfg.DISTILL.INHERIT.PREFIXES = ["nope."]
    report = run_check(cfg, num_images=0)
    assert not report.ok and any(e.startswith("DISTILL.INHERIT: InheritError") for e in report.errors)
