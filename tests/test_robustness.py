"""
Robustness: every head on degenerate ground truth, the non-finite-loss guard,
atomic checkpoints, a full resume of optimizer/scheduler/iteration/head state, and the
teacher evaluated beside the student.
"""

import copy
import glob
import itertools
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase, hooks
from torch import nn

from d2kd import DistillTrainer
from d2kd.data.mapper import SafeDatasetMapper
from d2kd.data.subset import register_subset_dataset
from d2kd.engine.checkpoint import SafeCheckpointer
from d2kd.engine.hooks import NonFiniteLossError, check_finite_losses
from d2kd.heads import DISTILL_HEAD_REGISTRY

from conftest import CONFIGS, distill_cfg, save_random_checkpoint

FITNET = "bccd/distill_fitnet_R50_R18.yaml"


def smaller(cfg):
    """Inputs of 96 x <=128 px for student and teacher (the tests here only need plumbing)."""
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.DISTILL.TEACHER.OPTS = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128,
                                "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 100]
    return cfg


# ---------------------------------------------------------------------------------------
# Every registered head on images with no box, a crowd box and a 1x1 px box
# ---------------------------------------------------------------------------------------


def registered_heads():
    return sorted(cls.registry_name() for _, cls in DISTILL_HEAD_REGISTRY)


def config_for_head(name: str) -> str:
    """The head's BCCD config, else any BCCD config of it (e.g. RetinaNet), else fitnet's + HEADS."""
    exact = os.path.join("bccd", f"distill_{name}_R50_R18.yaml")
    if os.path.isfile(os.path.join(CONFIGS, exact)):
        return exact
    others = sorted(glob.glob(os.path.join(CONFIGS, "bccd", f"distill_{name}_*.yaml")))
    return os.path.relpath(others[0], CONFIGS) if others else FITNET


def degenerate_batch(cfg):
    """Three BCCD images through the training mapper: no box; a crowd box + a box; a 1x1 px box."""
    dicts = copy.deepcopy(DatasetCatalog.get("bccd_train")[:3])
    normal = dicts[1]["annotations"][0]
    dicts[0]["annotations"] = []
    crowd = dict(normal, bbox=[50.0, 40.0, 400.0, 300.0], iscrowd=1)
    dicts[1]["annotations"] = [crowd, normal]
    dicts[2]["annotations"] = [dict(normal, bbox=[100.0, 100.0, 101.0, 101.0], category_id=2)]
    mapper = SafeDatasetMapper(cfg, True)
    batch = [mapper(d) for d in dicts]
    assert [len(x["instances"]) for x in batch] == [0, 1, 1], "crowd boxes are dropped by the mapper"
    assert float(batch[2]["instances"].gt_boxes.area()[0]) < 1.0  # smaller than a pixel after resize
    return batch


@pytest.mark.parametrize("head", registered_heads())
def test_every_head_handles_empty_crowd_and_tiny_boxes(tmp_path, head):
    """
    One training step at a late iteration (past every warm-up) of the head's BCCD config on
    a hand-made batch; the teacher has the student's architecture (random weights).
    """
    config = config_for_head(head)
    weights = save_random_checkpoint(config, str(tmp_path / "teacher.pth"))
    # A small training set keeps hooks that read it (e.g. GKD's prototypes) fast.
    register_subset_dataset("robust_bccd_train_12", "bccd_train", 12)
    cfg = distill_cfg(
        config,
        tmp_path / "run",
        weights,
        teacher_config=config,
        opts=["DISTILL.HEADS", [head], "DISTILL.WARMUP_ITERS", 0, "DISTILL.STOP_ITER", -1,
              "DATASETS.TRAIN", ("robust_bccd_train_12",)],
        max_iter=2000,
    )
    smaller(cfg)
    trainer = DistillTrainer(cfg)
    batch = degenerate_batch(cfg)
    trainer._trainer._data_loader_iter_obj = (copy.deepcopy(batch) for _ in itertools.count())
    trainer.checkpointer.save_to_disk = False
    trainer.start_iter, trainer.max_iter = 1000, 1001
    trainer.train()  # the non-finite guard raises naming the term if a loss is NaN/inf

    kd_terms = [k for k in trainer.storage.histories() if k.startswith(f"loss_kd_{head}")]
    assert kd_terms, f"head {head} logged no loss term"
    for k in kd_terms:
        value = trainer.storage.history(k).latest()
        assert torch.isfinite(torch.tensor(value)), f"{k} = {value}"


# ---------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------


def test_check_finite_losses_names_the_terms():
    check_finite_losses({"loss_cls": torch.tensor(0.5), "loss_kd_fitnet_p2": 1.0}, 3)
    with pytest.raises(NonFiniteLossError) as e:
        check_finite_losses(
            {"loss_cls": torch.tensor(0.5), "loss_kd_fitnet_p2": torch.tensor(float("nan")),
             "loss_kd_fgd_global": torch.tensor(float("inf"))},
            17,
            "out/model_0000009.pth",
            {"fitnet": "DISTILL.FITNET", "fgd": "DISTILL.FGD"},
        )
    text = str(e.value)
    assert "iteration 17" in text and "loss_kd_fitnet_p2 = nan" in text and "loss_kd_fgd_global = inf" in text
    assert "loss_cls=0.5" in text and "out/model_0000009.pth" in text
    assert "DISTILL.FITNET.WEIGHT" in text and "DISTILL.FGD.WEIGHT" in text


def test_nan_term_stops_training_and_keeps_last_good_checkpoint(tmp_path, teacher_r18_weights):
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=3))
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.heads["fitnet"]
    original = head.forward

    def poisoned(student, teacher, step):
        terms = original(student, teacher, step)
        if step.iteration == 1:
            terms["p3"] = terms["p3"] * float("nan")
        return terms

    head.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: loss_kd_fitnet_p3 = nan.*model_0000000\.pth"):
        trainer.train()

    out = cfg.OUTPUT_DIR
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "model_*.pth"))) == ["model_0000000.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000000.pth"
    saved = torch.load(os.path.join(out, "model_0000000.pth"), weights_only=True)
    # The failing step made no update: the live student still equals the last checkpoint.
    for k, v in trainer.student.state_dict().items():
        assert torch.isfinite(saved["model"][k].float()).all(), k
        assert torch.equal(saved["model"][k], v), f"{k} changed after the last good checkpoint"


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    import d2kd.engine.checkpoint as checkpoint_module

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL" * 100)  # half a file reached the disk, then the process "crashes"
        raise OSError("No space left on device")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        checkpointer.save("model_0000001")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    restored = nn.Linear(3, 2)
    SafeCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, before[k])


class _Counter(HookBase):
    """Changes a head buffer every step, standing in for any head state (prototypes, EMA...)."""

    def __init__(self, head):
        self.head = head

    def after_step(self):
        self.head.robust_probe += 1.0


def test_resume_restores_optimizer_scheduler_iteration_and_head_state(tmp_path, teacher_r18_weights):
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=2))
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = (1,), 0.5  # an LR decay inside the first run
    first = DistillTrainer(cfg)
    first.heads["fitnet"].register_buffer("robust_probe", torch.zeros(2))
    first.register_hooks([_Counter(first.heads["fitnet"])])
    first._hooks.insert(0, first._hooks.pop())  # before the checkpointer, like a head's own hook
    first.resume_or_load(resume=False)
    first.train()
    assert first.heads["fitnet"].robust_probe.tolist() == [2.0, 2.0]

    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 4
    second = DistillTrainer(cfg)
    second.heads["fitnet"].register_buffer("robust_probe", torch.zeros(2))
    second.resume_or_load(resume=True)

    assert second.start_iter == 2
    assert second.heads["fitnet"].robust_probe.tolist() == [2.0, 2.0]
    assert second.scheduler.last_epoch == first.scheduler.last_epoch == 2
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"])
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)  # the decay at step 1 is kept
    a, b = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert a and set(a) == set(b)
    for i in a:
        for key, value in a[i].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[i][key]), f"optimizer state {i}/{key}"
    for k, v in first.heads.state_dict().items():
        assert torch.equal(v, second.heads.state_dict()[k]), k


# ---------------------------------------------------------------------------------------
# Teacher beside student
# ---------------------------------------------------------------------------------------


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
    assert set(trainer._last_eval_results) == {"bbox", "teacher/bbox"}
