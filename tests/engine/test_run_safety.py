"""
Run safety: a diverging run loses nothing and says how to continue; --eval-only never scores
the wrong weights; --resume names a missing checkpoint or other heads; damaged weight files are
named with their config key; --overwrite sets the whole previous run aside.
"""

import glob
import logging
import os
import re

import pytest
import torch
from torch import nn

from d2kd import DistillTrainer
from d2kd.engine.checkpoint import ResumeMismatchError, SafeCheckpointer
from d2kd.engine.hooks import NonFiniteGradientError, TrainingDivergedError
from d2kd.modeling.student_weights import StudentWeightsError, load_student
from d2kd.modeling.teacher import CheckpointFileError, build_teacher

from conftest import FITNET, cli_args, distill_cfg, load_test_cfg, smaller, train, train_net

PLAIN = "bccd/student_R18_FPN.yaml"


def _checkpoints(folder):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), "model_*.pth")))


def _last_checkpoint(folder):
    with open(os.path.join(str(folder), "last_checkpoint")) as f:
        return f.read().strip()


def _assert_finite(path):
    saved = torch.load(path, weights_only=False)
    tensors = list(saved["model"].items()) + [
        (f"optimizer/{i}/{k}", v)
        for i, state in saved["trainer"]["_trainer"]["optimizer"]["state"].items()
        for k, v in state.items()
    ]
    for name, value in tensors:
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"{path}: {name} is not finite"
    return saved


# ---------------------------------------------------------------------------------------
# 1. Divergence
# ---------------------------------------------------------------------------------------


def test_checkpointer_refuses_to_save_nonfinite_parameters_or_optimizer_state(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    checkpointer = SafeCheckpointer(model, str(tmp_path), optimizer=optimizer)
    checkpointer.save("model_0000000", iteration=0)

    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"iteration 1 .*model/weight.*model_0000000\.pth.*SOLVER\.BASE_LR"):
        checkpointer.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    optimizer.state[model.bias]["momentum_buffer"][0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"optimizer/state/1/momentum_buffer"):
        checkpointer.save("model_0000002", iteration=2)
    assert _checkpoints(tmp_path) == ["model_0000000.pth"]
    assert _last_checkpoint(tmp_path) == "model_0000000.pth"


@pytest.mark.train
def test_divergent_run_stops_with_one_message_and_resumes_from_a_finite_checkpoint(tmp_path, teacher_r18_weights):
    """SOLVER.BASE_LR 1000: the detector's own FloatingPointError (or a non-finite loss or gradient)."""
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=8))
    cfg.SOLVER.BASE_LR = 1000.0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    with pytest.raises(TrainingDivergedError) as e:
        train(cfg)
    text = str(e.value)
    last = _last_checkpoint(tmp_path)
    assert "iteration" in text and os.path.join(str(tmp_path), last) in text and "--resume" in text
    assert "SOLVER.BASE_LR" in text and "SOLVER.WARMUP_ITERS" in text and "DISTILL.FITNET.WEIGHT" in text
    for name in _checkpoints(tmp_path):
        _assert_finite(os.path.join(str(tmp_path), name))

    saved = _assert_finite(os.path.join(str(tmp_path), last))
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == saved["iteration"] + 1
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k


@pytest.mark.train
def test_nonfinite_gradient_stops_before_the_update(tmp_path, teacher_r18_weights):
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=3))
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    name, param = next((n, p) for n, p in trainer.student.named_parameters() if n.endswith("res2.0.conv1.weight"))
    param.register_hook(lambda g: g * float("nan") if trainer.iter == 1 else g)
    with pytest.raises(NonFiniteGradientError, match=rf"iteration 1 .*student\.{name}.*model_0000000\.pth"):
        trainer.train()
    assert _checkpoints(tmp_path) == ["model_0000000.pth"] and _last_checkpoint(tmp_path) == "model_0000000.pth"
    saved = _assert_finite(os.path.join(str(tmp_path), "model_0000000.pth"))
    for k, v in trainer.student.state_dict().items():  # the bad step made no update
        assert torch.equal(saved["model"][k], v), k


# ---------------------------------------------------------------------------------------
# 2. --eval-only loads the student strictly
# ---------------------------------------------------------------------------------------


def test_eval_only_without_weights_is_an_error_unless_asked(tmp_path, teacher_r18_weights):
    args = cli_args(FITNET, tmp_path / "eval", teacher_r18_weights, eval_only=True)
    with pytest.raises(StudentWeightsError, match=r"MODEL\.WEIGHTS is empty.*--allow-partial-weights"):
        train_net.main(args)
    args = cli_args(FITNET, tmp_path / "eval", teacher_r18_weights, eval_only=True, allow_partial_weights=True)
    assert train_net.main(args) == {}  # DATASETS.TEST is empty here: nothing to evaluate, no error


def test_eval_only_refuses_weights_that_do_not_fit_the_student(tmp_path, teacher_r18_weights, teacher_r50_weights):
    args = cli_args(FITNET, tmp_path / "eval", teacher_r18_weights, ["MODEL.WEIGHTS", teacher_r50_weights], eval_only=True)
    with pytest.raises(StudentWeightsError, match=r"MODEL\.WEIGHTS.*(wrong shape|unexpected).*--allow-partial-weights"):
        train_net.main(args)

    extra = torch.load(teacher_r18_weights, weights_only=False)
    extra["model"]["roi_heads.extra_layer.weight"] = torch.zeros(2)
    torch.save(extra, str(tmp_path / "extra.pth"))
    args = cli_args(FITNET, tmp_path / "eval", teacher_r18_weights, ["MODEL.WEIGHTS", tmp_path / "extra.pth"], eval_only=True)
    with pytest.raises(StudentWeightsError, match=r"unexpected \(1\): \['roi_heads\.extra_layer\.weight'\]"):
        train_net.main(args)


# ---------------------------------------------------------------------------------------
# 3. --resume: no checkpoint; other heads
# ---------------------------------------------------------------------------------------


def test_resume_into_a_folder_without_checkpoint_warns_naming_it(tmp_path, d2kd_logs):
    cfg = load_test_cfg(PLAIN, tmp_path / "typo")
    trainer = DistillTrainer(cfg)
    logs = d2kd_logs("d2kd.engine.trainer", logging.WARNING)
    trainer.resume_or_load(resume=True)
    warnings = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "typo") in m and "no checkpoint" in m and "NEW run" in m for m in warnings), warnings
    assert trainer.start_iter == 0


@pytest.mark.train
@pytest.mark.parametrize("first, then", [("fitnet", "plain"), ("plain", "fitnet")])
def test_resume_with_other_heads_names_the_difference(tmp_path, teacher_r18_weights, first, then):
    def config(kind):
        if kind == "plain":
            return load_test_cfg(PLAIN, tmp_path, max_iter=1)
        return smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=1))

    train(config(first))
    trainer = DistillTrainer(config(then))
    side = "only in the checkpoint" if first == "fitnet" else "only in the config"
    with pytest.raises(ResumeMismatchError, match=rf"model_final\.pth.*DISTILL\.HEADS.*{side}: \['fitnet'\]"):
        trainer.resume_or_load(resume=True)


@pytest.mark.train
@pytest.mark.parametrize("first, then", [(["p2", "p3"], ["p2", "p3", "p4"]), (["p2", "p3", "p4"], ["p2", "p3"])])
def test_resume_with_other_head_options_names_the_option(tmp_path, teacher_r18_weights, first, then):
    def config(levels):
        return smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, opts=["DISTILL.FITNET.IN_FEATURES", levels], max_iter=1))

    train(config(first))
    trainer = DistillTrainer(config(then))
    with pytest.raises(
        ResumeMismatchError,
        match=rf"model_final\.pth: the run's heads \['fitnet'\] were trained with other head options: "
        rf"DISTILL\.FITNET\.IN_FEATURES was {re.escape(repr(first))} in the run, is {re.escape(repr(then))} now",
    ):
        trainer.resume_or_load(resume=True)


# ---------------------------------------------------------------------------------------
# 4. Damaged weight files
# ---------------------------------------------------------------------------------------


def _damage(source, target, kind):
    data = open(source, "rb").read()
    damaged = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint\n" * 50}[kind]
    with open(target, "wb") as f:
        f.write(damaged)
    return str(target)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage"])
def test_damaged_teacher_weights_name_the_file_and_the_key(tmp_path, teacher_r18_weights, kind):
    broken = _damage(teacher_r18_weights, tmp_path / "teacher.pth", kind)
    with pytest.raises(CheckpointFileError, match=rf"DISTILL\.TEACHER\.WEIGHTS {broken} cannot be read"):
        build_teacher(distill_cfg(FITNET, tmp_path, broken))


def test_damaged_model_weights_name_the_file_and_the_key(tmp_path, teacher_r18_weights):
    broken = _damage(teacher_r18_weights, tmp_path / "student.pth", "truncated")
    cfg = load_test_cfg(PLAIN, tmp_path / "run", ["MODEL.WEIGHTS", broken])
    with pytest.raises(CheckpointFileError, match=rf"MODEL\.WEIGHTS {broken} cannot be read"):
        DistillTrainer(cfg).resume_or_load(resume=False)
    with pytest.raises(CheckpointFileError, match=rf"MODEL\.WEIGHTS {broken} cannot be read"):
        load_student(cfg, broken)


@pytest.mark.train
def test_resume_from_a_damaged_checkpoint_points_to_the_previous_intact_one(tmp_path):
    cfg = load_test_cfg(PLAIN, tmp_path, max_iter=2)
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    train(cfg)
    assert _last_checkpoint(tmp_path) == "model_final.pth"
    final = str(tmp_path / "model_final.pth")
    _damage(final, final, "truncated")
    with pytest.raises(CheckpointFileError, match=r"last_checkpoint.*model_final\.pth cannot be read.*'model_0000001\.pth'"):
        DistillTrainer(cfg).resume_or_load(resume=True)

    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")  # the advice of the message
    resumed = DistillTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


# ---------------------------------------------------------------------------------------
# 5. --overwrite sets the whole previous run aside
# ---------------------------------------------------------------------------------------


def test_overwrite_sets_aside_config_and_checkpoints_even_if_the_new_run_fails(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    previous = {
        "config.yaml": "previous config",
        "model_0000004.pth": "previous checkpoint",
        "model_final.pth": "previous weights",
        "last_checkpoint": "model_final.pth",
        "metrics.json": '{"iteration": 4}\n',
        "eval_results.json": '{"bbox": {"AP": 1.0}}',
    }
    for name, text in previous.items():
        (out / name).write_text(text)
    args = cli_args(FITNET, out, tmp_path / "no_teacher.pth", overwrite=True)
    with pytest.raises(Exception, match="no_teacher.pth"):  # fails before its first iteration
        train_net.main(args)

    [kept] = list((out / "previous_runs").iterdir())
    assert {name: (kept / name).read_text() for name in previous} == previous
    assert _checkpoints(out) == [] and not (out / "last_checkpoint").exists()
    assert not (out / "eval_results.json").exists()
    assert (out / "config.yaml").read_text() != "previous config"
