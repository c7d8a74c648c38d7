"""
Mixed precision in CI: ``SOLVER.AMP.ENABLED`` on a CPU trains every BCCD preset under bfloat16
autocast through DistillTrainer (d2kd.engine.amp), and ``DISTILL.TEACHER.PRECISION`` runs the
teacher in reduced precision while the heads receive fp32 records.
"""

import glob
import math
import os

import pytest
import torch
from detectron2.engine import SimpleTrainer

from d2kd import DistillTrainer
from d2kd.data.subset import register_subset_dataset
from d2kd.engine.amp import CPUAMPTrainer, build_step_trainer, parse_precision
from d2kd.modeling.teacher import cast_floating, teacher_autocast

from conftest import (
    CONFIGS,
    RETINA_STUDENT,
    build_distiller,
    distill_cfg,
    save_random_checkpoint,
    smaller,
    step,
    synthetic_batch,
)


def bccd_presets():
    """Every two-stage (``distill_*_R50_R18``) and RetinaNet (``*_retinanet_*``) BCCD preset."""
    paths = glob.glob(os.path.join(CONFIGS, "bccd", "distill_*_R50_R18.yaml"))
    paths += glob.glob(os.path.join(CONFIGS, "bccd", "*_retinanet_*.yaml"))
    return sorted({os.path.relpath(p, CONFIGS) for p in paths})


@pytest.fixture(scope="module")
def amp_teachers(tmp_path_factory):
    """Random R18-FPN teachers: Faster R-CNN and RetinaNet (the plumbing does not need good ones)."""
    d = tmp_path_factory.mktemp("amp_teachers")
    return {
        "rcnn": ("bccd/student_R18_FPN.yaml", save_random_checkpoint("bccd/student_R18_FPN.yaml", str(d / "rcnn.pth"))),
        "retinanet": (RETINA_STUDENT, save_random_checkpoint(RETINA_STUDENT, str(d / "retina.pth"))),
    }


def amp_cfg(config, output_dir, amp_teachers, opts=()):
    """A preset shrunk to 96 px, with AMP on, past every warm-up, on a 12-image training set."""
    register_subset_dataset("amp_bccd_train_12", "bccd_train", 12)
    teacher_config, weights = amp_teachers["retinanet" if "retinanet" in config else "rcnn"]
    cfg = distill_cfg(
        config,
        output_dir,
        weights,
        teacher_config=teacher_config,
        opts=["SOLVER.AMP.ENABLED", True, "DISTILL.WARMUP_ITERS", 0, "DISTILL.STOP_ITER", -1,
              "DATASETS.TRAIN", ("amp_bccd_train_12",)] + list(opts),
        max_iter=2000,
    )
    return smaller(cfg)


@pytest.mark.train
@pytest.mark.parametrize("config", bccd_presets(), ids=lambda c: os.path.basename(c)[len("distill_"):-len(".yaml")])
def test_every_bccd_preset_trains_two_iterations_with_cpu_amp(tmp_path, amp_teachers, config):
    """Two steps under CPU bf16 autocast, late enough that heads' own warm-ups are over: finite terms."""
    cfg = amp_cfg(config, tmp_path, amp_teachers)
    trainer = DistillTrainer(cfg)
    assert isinstance(trainer._trainer, CPUAMPTrainer) and trainer._trainer.precision == torch.bfloat16
    trainer.resume_or_load(resume=False)
    trainer.checkpointer.save_to_disk = False
    trainer.start_iter, trainer.max_iter = 1000, 1002
    trainer.train()  # the non-finite guard raises, naming the term, on a NaN/inf loss or gradient

    histories = trainer.storage.histories()
    terms = [k for k in histories if k.startswith("loss")]
    if cfg.DISTILL.HEADS:
        assert any(k.startswith("loss_kd_") for k in terms), f"{config}: no distillation term logged"
    for k in terms:
        values = [v for v, _ in histories[k].values()]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), (k, values)


def test_step_trainer_choice():
    """No AMP: SimpleTrainer; AMP on CPU: bf16 autocast whatever the (CUDA) precision says."""
    from d2kd import get_distill_cfg

    cfg = get_distill_cfg()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(build_step_trainer(cfg, model, [], optimizer, "cpu")) is SimpleTrainer
    cfg.SOLVER.AMP.ENABLED = True
    for precision in ("float16", "bfloat16", "bf16"):
        cfg.SOLVER.AMP.PRECISION = precision
        trainer = build_step_trainer(cfg, model, [], optimizer, "cpu")
        assert isinstance(trainer, CPUAMPTrainer) and trainer.precision == torch.bfloat16
    cfg.SOLVER.AMP.PRECISION = "int8"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION"):
        build_step_trainer(cfg, model, [], optimizer, "cpu")
    assert parse_precision("fp16") == torch.float16 and parse_precision("BFloat16") == torch.bfloat16


@pytest.mark.train
def test_cpu_amp_step_runs_the_forward_in_bf16_and_keeps_fp32_parameters(tmp_path, amp_teachers):
    """The student's convolutions see bf16 autocast; parameters and their gradients stay fp32."""
    cfg = amp_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, amp_teachers)
    trainer = DistillTrainer(cfg)
    seen = []
    handle = trainer.student.backbone.register_forward_hook(
        lambda m, i, o: seen.append({k: v.dtype for k, v in o.items()}) if m.training else None
    )
    trainer.resume_or_load(resume=False)
    trainer.checkpointer.save_to_disk = False
    trainer.max_iter = 1
    trainer.train()
    handle.remove()
    assert seen and all(d == torch.bfloat16 for d in seen[0].values()), seen
    params = list(trainer.model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)


# ---------------------------------------------------------------------------------------
# DISTILL.TEACHER.PRECISION
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_teacher_precision_runs_the_teacher_reduced_and_hands_fp32_records(tmp_path, amp_teachers, precision):
    """
    The teacher's backbone runs under autocast in ``precision`` (its outputs are reduced), the
    heads receive fp32 records, and the loss stays close to the fp32 teacher's (rel 5e-2: a
    bf16 teacher's features carry ~3 significant digits; FitNet's MSE averages their errors).
    """
    cfg = amp_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, amp_teachers, opts=["SOLVER.AMP.ENABLED", False])
    batch = synthetic_batch(sizes=((96, 112), (96, 128)))

    def run(teacher_precision):
        c = cfg.clone()
        c.DISTILL.TEACHER.PRECISION = teacher_precision
        model = build_distiller(c)
        model.teacher_runner.precision = teacher_precision
        raw, received = [], []
        model.teacher.backbone.register_forward_hook(lambda m, i, o: raw.append({k: v.dtype for k, v in o.items()}))
        head = model.heads["fitnet"]
        original = head.forward
        head.forward = lambda s, t, st: (received.append({k: v.dtype for k, v in t.output("backbone").items()}), original(s, t, st))[1]
        losses = step(model, batch)
        return raw[0], received[0], {k: float(v) for k, v in losses.items() if k.startswith("loss_kd_")}

    raw32, received32, reference = run("")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    raw, received, reduced = run(precision)
    assert set(raw32.values()) == {torch.float32} and set(received32.values()) == {torch.float32}
    assert set(raw.values()) == {dtype}, raw
    assert set(received.values()) == {torch.float32}, received
    for k, v in reference.items():
        assert math.isfinite(reduced[k]) and reduced[k] == pytest.approx(v, rel=5e-2), (k, v, reduced[k])


@pytest.mark.train
def test_teacher_precision_option_is_checked_and_trains(tmp_path, amp_teachers):
    """A bad value fails at build naming the option; a bf16 teacher trains without AMP."""
    with pytest.raises(ValueError, match="DISTILL.TEACHER.PRECISION"):
        teacher_autocast("int4", "cpu")
    cfg = amp_cfg(
        "bccd/distill_fitnet_R50_R18.yaml", tmp_path, amp_teachers,
        opts=["SOLVER.AMP.ENABLED", False, "DISTILL.TEACHER.PRECISION", "bf16"],
    )
    trainer = DistillTrainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer
    trainer.resume_or_load(resume=False)
    trainer.checkpointer.save_to_disk = False
    trainer.max_iter = 2
    trainer.train()
    assert all(math.isfinite(v) for v, _ in trainer.storage.history("loss_kd_fitnet_p2").values())


def test_cast_floating_reaches_nested_records():
    from detectron2.structures import Boxes, Instances

    inst = Instances((4, 4), proposal_boxes=Boxes(torch.zeros(2, 4, dtype=torch.bfloat16)),
                     objectness_logits=torch.zeros(2, dtype=torch.bfloat16), gt_classes=torch.zeros(2, dtype=torch.long))
    out = cast_floating({"a": [torch.ones(1, dtype=torch.float16)], "b": (inst, 3)})
    assert out["a"][0].dtype == torch.float32 and out["b"][1] == 3
    assert out["b"][0].proposal_boxes.tensor.dtype == torch.float32
    assert out["b"][0].objectness_logits.dtype == torch.float32 and out["b"][0].gt_classes.dtype == torch.long


@pytest.mark.train
def test_overhead_benchmark_measures_a_bf16_teacher(tmp_path, results_dir_untouched, load_script):
    """benchmarks/overhead.py --teacher-precision: one row per precision, the teacher run as asked."""
    import json

    overhead = load_script("overhead")
    assert overhead.main(["--quick", "--teacher-precision", "bf16", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead_quick.json").read_text())
    (row,) = data["methods"]
    assert row["method"] == "fitnet" and row["teacher_precision"] == "bf16"
    assert data["setup"]["teacher_precisions"] == ["bf16"] and row["time_ms"]["teacher"]["median"] > 0
    assert "| fitnet | bf16 |" in (tmp_path / "overhead_quick.md").read_text()
