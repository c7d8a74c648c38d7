"""DistillTrainer: teacher hygiene, checkpoints, resume, seeding, the teacher evaluated beside the student."""

import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase, hooks
from detectron2.modeling import build_model

from d2kd import DistillTrainer
from d2kd.data.subset import register_subset_dataset

from conftest import FITNET, cli_args, distill_cfg, load_test_cfg, smaller, train, train_net


@pytest.mark.train
def test_teacher_frozen_in_eval_and_outside_the_student(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=["DISTILL.HEADS", ["fitnet", "kd"]])
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher = trainer.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []
    trainer.register_hooks([_ModeProbe(teacher, modes)])
    trainer.train()

    assert modes and not any(modes), "the teacher was in train mode during a step"
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher parameter {k} changed"
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}, "teacher parameters are in the optimizer"
    adapter_params = {id(p) for p in trainer.heads.parameters()}
    assert adapter_params and adapter_params <= optimised, "adapters are not optimised"
    student_keys = set(trainer.student.state_dict())
    assert not any(k.startswith("teacher") for k in student_keys)
    # The student and adapters did learn.
    assert len(trainer.storage.history("loss_kd_fitnet_p2").values()) == 2


class _ModeProbe(HookBase):
    """A hook recording the teacher's training flag after every step."""

    def __init__(self, teacher, modes):
        self.teacher, self.modes = teacher, modes

    def after_step(self):
        self.modes.append(self.teacher.training)


@pytest.mark.train
@pytest.mark.parametrize("heads,teacher_first", [(["fitnet"], True), (["kd"], False)])
def test_teacher_runs_first_unless_it_reads_the_student_proposals(tmp_path, teacher_r18_weights, heads, teacher_first):
    """Feature-only teachers run before the student (lower peak memory); RoI teachers after it."""
    cfg = distill_cfg(
        "bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights, opts=["DISTILL.HEADS", heads], max_iter=1
    )
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    order = []
    handles = [
        trainer.teacher.backbone.register_forward_pre_hook(lambda m, i: order.append("teacher")),
        trainer.student.backbone.register_forward_pre_hook(lambda m, i: order.append("student")),
    ]
    try:
        trainer.train()
    finally:
        for h in handles:
            h.remove()
    # Evaluation is off in tests (EVAL_PERIOD 0, no test set run after training): one step only.
    assert order == (["teacher", "student"] if teacher_first else ["student", "teacher"])


@pytest.mark.train
def test_final_checkpoint_loads_into_plain_detectron2(tmp_path, teacher_r18_weights):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights)
    trainer = train(cfg)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert os.path.isfile(final)

    student_cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path / "plain")
    model = build_model(student_cfg)
    checkpointer = DetectionCheckpointer(model)
    incompatible = []
    original = checkpointer._load_model
    checkpointer._load_model = lambda ckpt: incompatible.append(original(ckpt)) or incompatible[-1]
    checkpointer.load(final)
    assert not incompatible[0].missing_keys and not incompatible[0].unexpected_keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.student.state_dict()[k]), k
    saved = torch.load(final, weights_only=True)
    assert set(saved["distiller"]) == set(trainer.heads.state_dict()), "adapters are saved beside the student"


@pytest.mark.train
def test_resume_equals_straight_run(tmp_path, teacher_r18_weights):
    opts = ["INPUT.RANDOM_FLIP", "none", "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 7]
    straight_cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path / "straight", teacher_r18_weights, opts=opts, max_iter=4)
    torch.manual_seed(0)
    straight = train(straight_cfg)

    split_cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path / "split", teacher_r18_weights, opts=opts, max_iter=2)
    torch.manual_seed(0)
    train(split_cfg)
    split_cfg.defrost()
    split_cfg.SOLVER.MAX_ITER = 4
    resumed = train(split_cfg, resume=True)
    assert resumed.start_iter == 2

    for name, module in (("student", "student"), ("adapters", "heads")):
        a = getattr(straight, module).state_dict()
        b = getattr(resumed, module).state_dict()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


@pytest.mark.train
def test_plain_config_trains_a_plain_detector(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    trainer = train(cfg)
    assert trainer.teacher is None and len(trainer.heads) == 0
    assert not any(k.startswith("loss_kd") for k in trainer.storage.histories())


def test_one_seed_gives_baseline_and_distilled_student_the_same_start_and_data(tmp_path, teacher_r18_weights):
    """
    The accuracy study's paired gain (method - baseline at the same SEED) relies on this: the
    student is built before the teacher and the loader has its own seeded generator, so the
    same SEED gives the same initial student, image order and augmentation with or without
    distillation (only RoI/anchor sampling, on torch's global generator, can differ).
    """
    from detectron2.utils.env import seed_all_rng

    def start(cfg):
        cfg.SEED, cfg.DATALOADER.NUM_WORKERS = 3, 1  # the BCCD configs' one worker
        seed_all_rng(cfg.SEED)  # as default_setup does
        trainer = DistillTrainer(cfg)
        batches = []
        for batch in trainer.data_loader:
            batches.append([(d["file_name"], d["image"].clone()) for d in batch])
            if len(batches) == 3:
                break
        return trainer.student.state_dict(), batches

    plain_state, plain_batches = start(load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path / "plain"))
    distill_state, distill_batches = start(
        distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path / "distill", teacher_r18_weights)
    )
    assert plain_state.keys() == distill_state.keys()
    assert all(torch.equal(plain_state[k], distill_state[k]) for k in plain_state), "different initial student"
    # image order and flips: the same files with the same pixels, batch by batch
    for plain, distill in zip(plain_batches, distill_batches):
        assert [name for name, _ in plain] == [name for name, _ in distill]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain, distill)), "different augmentation"
    # and a different SEED does change the start (the check above can fail)
    other_cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path / "other")
    seed_all_rng(4)
    other_cfg.SEED = 4
    other = DistillTrainer(other_cfg).student.state_dict()
    assert not all(torch.equal(plain_state[k], other[k]) for k in plain_state)


# ---------------------------------------------------------------------------------------
# The teacher evaluated beside the student
# ---------------------------------------------------------------------------------------


@pytest.mark.train
def test_teacher_is_evaluated_once_and_reported_beside_the_student(tmp_path, teacher_r18_weights, monkeypatch):
    register_subset_dataset("robust_bccd_test_1", "bccd_test", 1)
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights, opts=["DISTILL.EVAL_TEACHER", True], max_iter=2)
    smaller(cfg)
    cfg.DATASETS.TEST = ("robust_bccd_test_1",)
    cfg.TEST.EVAL_PERIOD = 1
    calls = []
    original = DistillTrainer.test_teacher.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "test_teacher", classmethod(counting))
    trainer = DistillTrainer(cfg)
    trainer.register_hooks([hooks.BestCheckpointer(1, trainer.checkpointer, "bbox/AP", mode="max")])
    trainer.resume_or_load(resume=False)
    trainer.train()

    latest = trainer.storage.latest()
    assert "bbox/AP" in latest and "teacher/bbox/AP" in latest and "teacher/bbox/AP50" in latest
    evaluations = trainer.storage.history("bbox/AP").values()
    assert len(evaluations) == 2, "evaluated after iteration 0 and at the end"
    assert len(calls) == 1, "the frozen teacher is evaluated once"
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_best.pth")), "BestCheckpointer(bbox/AP) still works"
    assert set(trainer.last_eval_results) == {"bbox", "teacher/bbox"}


def test_eval_only_reports_teacher_beside_student(tmp_path, teacher_r18_weights):
    register_subset_dataset("preflight_bccd_test_2", "bccd_test", 2)
    args = cli_args(
        FITNET, tmp_path / "run", teacher_r18_weights,
        ["DATASETS.TEST", "('preflight_bccd_test_2',)", "DISTILL.EVAL_TEACHER", "True", "MODEL.WEIGHTS", teacher_r18_weights],
        eval_only=True,
    )
    results = train_net.main(args)
    assert set(results) == {"bbox", "teacher/bbox"}
    with open(tmp_path / "run" / "eval_results.json") as f:
        saved = json.load(f)
    assert "AP" in saved["bbox"] and "AP" in saved["teacher/bbox"]
    # The student was loaded with the teacher's weights and has the teacher's architecture and
    # test settings: the teacher, run through its own pipeline, scores exactly the same.
    assert saved["bbox"]["AP50"] == saved["bbox"]["AP50"], "AP is a number, not NaN"
    for key in ("AP", "AP50", "AP75"):
        assert saved["bbox"][key] == pytest.approx(saved["teacher/bbox"][key], nan_ok=True)
