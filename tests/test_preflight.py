"""
Bad input fails before the first iteration with the problem and the fix; the pre-flight
check (``train_net.py --check``); OUTPUT_DIR protection and --eval-only.
"""

import json
import logging
import os
import sys
import tempfile

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from d2kd import DistillTrainer
from d2kd.capture import CaptureTargetError
from d2kd.data.subset import register_subset_dataset
from d2kd.engine.check import describe_shapes, run_check
from d2kd.engine.preflight import ConfigOptionError, OutputDirError, check_class_alignment
from d2kd.heads import DistillConfigError, DistillHead
from d2kd.heads.fitnet import FitNet
from d2kd.modeling.distiller import DistillationModel
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import TeacherWeightsError, build_teacher

from conftest import CONFIGS, REPO, distill_cfg, load_test_cfg, save_random_checkpoint

sys.path.insert(0, REPO)
import train_net  # noqa: E402

FITNET = "bccd/distill_fitnet_R50_R18.yaml"
KD = "bccd/distill_kd_R50_R18.yaml"


def cli_args(config, output_dir, teacher_weights, extra_opts=(), **flags):
    """train_net's argument namespace for a tiny BCCD run (the test sizes of conftest)."""
    opts = [
        "OUTPUT_DIR", str(output_dir),
        "DISTILL.TEACHER.CONFIG_FILE", os.path.join(CONFIGS, "bccd/student_R18_FPN.yaml"),
        "DISTILL.TEACHER.WEIGHTS", str(teacher_weights),
        "DISTILL.TEACHER.OPTS", "['INPUT.MIN_SIZE_TEST', 128, 'INPUT.MAX_SIZE_TEST', 192, "
        "'MODEL.RPN.PRE_NMS_TOPK_TEST', 200, 'MODEL.RPN.POST_NMS_TOPK_TEST', 100]",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "DISTILL.EVAL_TEACHER", "False",
    ] + [str(x) for x in extra_opts]
    argv = ["--config-file", os.path.join(CONFIGS, config)]
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return train_net.build_parser().parse_args(argv + opts)


# ---------------------------------------------------------------------------------------
# The pre-flight check
# ---------------------------------------------------------------------------------------


def test_check_prints_captures_adapters_losses_and_teacher_ap(tmp_path, teacher_r18_weights, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the check's own folder goes
    out = tmp_path / "run"
    args = cli_args(FITNET, out, teacher_r18_weights, ["DATASETS.TEST", "('bccd_test',)"], check=True, check_images=2)
    report = train_net.main(args)
    text = capsys.readouterr().out

    assert report.ok and not out.exists(), "the check never writes into OUTPUT_DIR"
    assert not list(tmp_path.glob("d2kd_check_*")), "a passed check removes its temporary folder"
    for phase in ("[check 1/4] building", "[check 2/4] reading one training batch",
                  "[check 3/4] one training step", "[check 4/4] evaluating the teacher on the first 2 images"):
        assert phase in text
    # Capture points with their shapes: FPN levels at the 128x192 padded input (strides 4..64).
    assert report.captures["student"]["backbone"].startswith("{p2: 2x128x32x48, p3: 2x128x16x24")
    assert report.captures["teacher"]["backbone"].startswith("{p2: 2x128x32x48")
    # 1x1 conv adapters 128 -> 128 channels: 128 * 128 weights + 128 biases each.
    assert report.modules["fitnet.pairing.adapters.p2"] == 128 * 128 + 128
    assert "fitnet: 82,560 trainable parameters" in text  # five of them
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"} <= set(report.losses)
    assert "x detector total" in text
    # A random teacher: AP ~ 0 is a warning, not an error.
    assert report.teacher_ap is not None and report.teacher_ap < 1.0
    assert any("teacher may be untrained" in w for w in report.warnings)
    assert "CHECK PASSED" in text


def test_check_fails_on_a_non_finite_term(tmp_path, teacher_r18_weights, monkeypatch, capsys):
    def nan_forward(self, student, teacher, step):
        return {"p2": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(FitNet, "forward", nan_forward)
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights)
    report = run_check(cfg, num_images=0)
    assert not report.ok
    assert any("loss_kd_fitnet_p2 is nan" in e for e in report.errors)
    assert "CHECK FAILED" in capsys.readouterr().out


def test_check_exits_non_zero_with_the_message(tmp_path, teacher_r18_weights, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = cli_args(FITNET, tmp_path / "run", teacher_r18_weights, ["DISTILL.HEADS", "['fitnett']"], check=True)
    with pytest.raises(SystemExit) as e:
        train_net.main(args)
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "ERROR: building the trainer: DistillConfigError: Unknown distillation head 'fitnett'" in text
    assert "CHECK FAILED" in text
    assert len(list(tmp_path.glob("d2kd_check_*"))) == 1, "a failed check keeps its log for inspection"


def test_describe_shapes():
    from detectron2.structures import Boxes, Instances

    inst = Instances((4, 4), proposal_boxes=Boxes(torch.zeros(3, 4)))
    assert describe_shapes({"p2": torch.zeros(2, 8, 4, 4), "x": [torch.zeros(5), inst]}) == "{p2: 2x8x4x4, x: [5, Instances(3)]}"


# ---------------------------------------------------------------------------------------
# Bad input: teacher
# ---------------------------------------------------------------------------------------


def test_teacher_config_not_found(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights)
    cfg.DISTILL.TEACHER.CONFIG_FILE = "configs/bccd/no_such_teacher.yaml"
    with pytest.raises(FileNotFoundError, match="teacher config.*no_such_teacher.yaml.*neither an existing file"):
        DistillTrainer(cfg)


def test_teacher_weights_with_missing_and_unexpected_keys(tmp_path, teacher_r18_weights):
    checkpoint = torch.load(teacher_r18_weights, weights_only=True)
    model = checkpoint["model"]
    removed = model.pop("roi_heads.box_predictor.cls_score.bias")
    model["roi_heads.extra_layer.weight"] = torch.zeros(3)
    partial = str(tmp_path / "partial.pth")
    torch.save(checkpoint, partial)

    cfg = distill_cfg(FITNET, tmp_path, partial)
    with pytest.raises(TeacherWeightsError) as e:
        build_teacher(cfg)
    text = str(e.value)
    assert "missing (1): ['roi_heads.box_predictor.cls_score.bias']" in text
    assert "unexpected (1): ['roi_heads.extra_layer.weight']" in text
    assert "STRICT_LOAD False" in text

    # Partial loading when asked: loaded keys come from the file, a report is logged.
    cfg.DISTILL.TEACHER.STRICT_LOAD = False
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    teacher_logger = logging.getLogger("d2kd.modeling.teacher")
    teacher_logger.addHandler(handler)
    try:
        teacher = build_teacher(cfg)
    finally:
        teacher_logger.removeHandler(handler)
    state = teacher.state_dict()
    assert torch.equal(state["roi_heads.box_predictor.cls_score.weight"], model["roi_heads.box_predictor.cls_score.weight"])
    assert state["roi_heads.box_predictor.cls_score.bias"].shape == removed.shape
    assert any("partial loading allowed" in r.getMessage() and "cls_score.bias" in r.getMessage() for r in records)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_with_another_number_of_classes_for_a_logit_head(tmp_path):
    four = save_random_checkpoint("bccd/student_R18_FPN.yaml", str(tmp_path / "four.pth"), opts=["MODEL.ROI_HEADS.NUM_CLASSES", 4])
    cfg = distill_cfg(KD, tmp_path, four)
    cfg.DISTILL.TEACHER.OPTS = list(cfg.DISTILL.TEACHER.OPTS) + ["MODEL.ROI_HEADS.NUM_CLASSES", 4]
    with pytest.raises(DistillConfigError, match="student has 3 classes and the teacher 4"):
        DistillTrainer(cfg)


def _register_classes(name, classes):
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def test_teacher_trained_on_classes_in_another_order(tmp_path, teacher_r18_weights):
    swapped = _register_classes("preflight_swapped", ["WBC", "RBC", "Platelets"])
    cfg = distill_cfg(KD, tmp_path, teacher_r18_weights)
    cfg.DISTILL.TEACHER.OPTS = list(cfg.DISTILL.TEACHER.OPTS) + ["DATASETS.TRAIN", (swapped,)]
    with pytest.raises(DistillConfigError, match=r"class 0 is 'WBC' for the teacher and 'RBC' for the student.*\['kd'\]"):
        DistillTrainer(cfg)


class _FakeHead:
    def __init__(self, parts, flag=None):
        self.teacher_parts = set(parts)
        if flag is not None:
            self.needs_aligned_classes = flag


def test_class_alignment_rules(tmp_path):
    from detectron2.config import CfgNode

    _register_classes("preflight_abc", ["a", "b", "c"])
    _register_classes("preflight_acb", ["a", "c", "b"])
    _register_classes("preflight_ab", ["a", "b"])
    def student_cfg(inherit):
        distill = CfgNode({"INHERIT": CfgNode({"ENABLED": inherit})})
        return CfgNode({"DATASETS": CfgNode({"TRAIN": ("preflight_abc",)}), "DISTILL": distill})

    student = student_cfg(inherit=False)

    def teacher(name):
        return CfgNode({"DATASETS": CfgNode({"TRAIN": (name,)})})

    check_class_alignment(student, teacher("preflight_abc"), {"kd": _FakeHead({"roi_box"})})
    check_class_alignment(student, teacher("preflight_acb"), {"fitnet": _FakeHead({"backbone"})})  # feature head: ok
    check_class_alignment(student, teacher("not_registered"), {"kd": _FakeHead({"roi_box"})})  # unknown: skip
    with pytest.raises(DistillConfigError, match="class 1 is 'c' for the teacher and 'b'"):
        check_class_alignment(student, teacher("preflight_acb"), {"dense": _FakeHead({"dense"})})
    with pytest.raises(DistillConfigError, match="2 teacher classes vs 3 student classes"):
        check_class_alignment(student, teacher("preflight_ab"), {"x": _FakeHead({"backbone"}, flag=True)})
    check_class_alignment(student, teacher("preflight_ab"), {"x": _FakeHead({"roi_box"}, flag=False)})
    # DISTILL.INHERIT copies the class predictor when the counts agree: same classes, same order.
    check_class_alignment(student, teacher("preflight_acb"), {})  # no head, no inheriting: nothing to check
    with pytest.raises(DistillConfigError, match=r"class 1 is 'c'.*DISTILL.INHERIT"):
        check_class_alignment(student_cfg(inherit=True), teacher("preflight_acb"), {})
    check_class_alignment(student_cfg(inherit=True), teacher("preflight_ab"), {})  # predictor not copied: logged


# ---------------------------------------------------------------------------------------
# Bad input: heads, options, capture targets, stages
# ---------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_intended_one(tmp_path, teacher_r18_weights):
    args = cli_args(FITNET, tmp_path / "a", teacher_r18_weights, ["DISTILL.FITNET.WEIGTH", "2.0"])
    with pytest.raises(ConfigOptionError, match=r"Unknown config key DISTILL.FITNET.WEIGTH in the command-line options. "
                                                r"Did you mean DISTILL.FITNET.WEIGHT"):
        train_net.main(args)
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(f'_BASE_: "{os.path.join(CONFIGS, FITNET)}"\nDISTILL:\n  KD:\n    TEMPERATUR: 2.0\n')
    args = train_net.build_parser().parse_args(["--config-file", str(bad_file)])
    with pytest.raises(ConfigOptionError, match=r"DISTILL.KD.TEMPERATUR in config file .*bad.yaml.*DISTILL.KD.TEMPERATURE"):
        train_net.main(args)
    args = cli_args(FITNET, tmp_path / "b", teacher_r18_weights, ["DISTILL.KD.TEMPERATURE", "hot"])
    with pytest.raises(ConfigOptionError, match=r"Type mismatch.*DISTILL.KD.TEMPERATURE.*command-line options"):
        train_net.main(args)
    args = cli_args(FITNET, tmp_path / "c", teacher_r18_weights, ["DISTILL.MYHEAD.WEIGHT", "1.0"])
    with pytest.raises(ConfigOptionError, match=r"DISTILL.MYHEAD.WEIGHT.*must be imported"):
        train_net.main(args)
    assert not (tmp_path / "a").exists(), "nothing is written for a bad config"


class _BadTargetHead(DistillHead):
    """Not registered: reads a student module that does not exist."""

    def __init__(self, cfg, context):
        super().__init__(cfg, context)
        self.student_modules = ["roi_heads.box_predictorr"]


def test_capture_target_that_does_not_exist_names_nearby_modules(tmp_path):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path)
    student, teacher = build_model(cfg), build_model(cfg)
    head = _BadTargetHead(cfg, None)
    with pytest.raises(CaptureTargetError, match=r"student has no module named 'roi_heads.box_predictorr'.*roi_heads.box_predictor"):
        DistillationModel(student, teacher, torch.nn.ModuleDict({"bad": head}), DistillSchedule())


def test_stages_no_adapter_can_align(tmp_path, teacher_r18_weights):
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights)
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2"]
    cfg.DISTILL.FITNET.TEACHER_FEATURES = ["p6"]
    with pytest.raises(ValueError, match=r"'p2' \(stride 4\) cannot be aligned with teacher feature 'p6' \(stride 64"):
        DistillTrainer(cfg)


def test_unregistered_dataset(tmp_path, teacher_r18_weights):
    args = cli_args(FITNET, tmp_path / "run", teacher_r18_weights, ["DATASETS.TRAIN", "('bccd_tran',)"])
    with pytest.raises(KeyError, match=r"Dataset 'bccd_tran' in DATASETS.TRAIN is not registered.*bccd_train"):
        train_net.main(args)


# ---------------------------------------------------------------------------------------
# OUTPUT_DIR and --eval-only
# ---------------------------------------------------------------------------------------


def test_previous_run_is_not_overwritten_silently(tmp_path, teacher_r18_weights):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"previous weights")
    (out / "config.yaml").write_text("previous config")
    (out / "metrics.json").write_text('{"iteration": 93, "loss_cls": 5.85}\n')
    (out / "log.txt").write_text("previous log\n")
    with pytest.raises(OutputDirError, match="--resume.*--overwrite"):
        train_net.main(cli_args(FITNET, out, teacher_r18_weights))
    assert (out / "config.yaml").read_text() == "previous config", "refused before writing anything"
    assert (out / "model_final.pth").read_bytes() == b"previous weights"
    assert (out / "metrics.json").read_text() == '{"iteration": 93, "loss_cls": 5.85}\n'

    train_net.main(cli_args(FITNET, out, teacher_r18_weights, overwrite=True))
    assert (out / "model_final.pth").read_bytes() != b"previous weights"
    assert torch.load(str(out / "model_final.pth"), weights_only=True)["iteration"] == 0
    # The previous run's logs were moved aside, not appended to.
    [kept] = list((out / "previous_runs").iterdir())
    assert (kept / "metrics.json").read_text() == '{"iteration": 93, "loss_cls": 5.85}\n'
    assert (kept / "log.txt").read_text() == "previous log\n"
    assert "previous log" not in (out / "log.txt").read_text()
    if (out / "metrics.json").exists():
        assert '"iteration": 93' not in (out / "metrics.json").read_text()


def test_set_aside_previous_logs_keeps_every_run(tmp_path):
    from d2kd.engine.preflight import set_aside_previous_logs

    assert set_aside_previous_logs(str(tmp_path)) is None
    for n in range(2):
        (tmp_path / "metrics.json").write_text(f"run {n}")
        (tmp_path / "events.out.tfevents.1.host.0").write_text(f"events {n}")
        (tmp_path / "model_0000199.pth").write_text("checkpoint")
        os.utime(tmp_path / "metrics.json", (1_000_000_000, 1_000_000_000))  # the same time stamp twice
        os.utime(tmp_path / "events.out.tfevents.1.host.0", (1_000_000_000, 1_000_000_000))
        set_aside_previous_logs(str(tmp_path))
    kept = sorted((tmp_path / "previous_runs").iterdir())
    assert [p.name[-2:] for p in kept][1] == "-1" and len(kept) == 2
    assert [(p / "metrics.json").read_text() for p in kept] == ["run 0", "run 1"]
    assert [(p / "events.out.tfevents.1.host.0").read_text() for p in kept] == ["events 0", "events 1"]
    assert (tmp_path / "model_0000199.pth").exists() and not (tmp_path / "metrics.json").exists()


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
