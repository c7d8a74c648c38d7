"""Bad input fails before the first iteration with the problem and the fix: classes, keys, datasets, OUTPUT_DIR."""

import logging
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd import DistillTrainer, register_voc_dataset
from d2kd.config import ConfigOptionError
from d2kd.data import DatasetFormatError
from d2kd.engine.preflight import OutputDirError, check_class_alignment
from d2kd.heads import DistillConfigError

from conftest import (
    CONFIGS,
    FITNET,
    VOC_CLASSES,
    cli_args,
    distill_cfg,
    jpeg_bytes,
    make_voc,
    save_random_checkpoint,
    tiny_train_cfg,
    train_net,
    voc_xml,
)


KD = "bccd/distill_kd_R50_R18.yaml"


# ---------------------------------------------------------------------------------------
# Bad input: the teacher's classes
# ---------------------------------------------------------------------------------------


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
# Bad input: config keys and datasets
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


def test_unregistered_dataset(tmp_path, teacher_r18_weights):
    args = cli_args(FITNET, tmp_path / "run", teacher_r18_weights, ["DATASETS.TRAIN", "('bccd_tran',)"])
    with pytest.raises(KeyError, match=r"Dataset 'bccd_tran' in DATASETS.TRAIN is not registered.*bccd_train"):
        train_net.main(args)


# ---------------------------------------------------------------------------------------
# OUTPUT_DIR
# ---------------------------------------------------------------------------------------


@pytest.mark.train
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


# ---------------------------------------------------------------------------------------
# Bad input: wrong option types; datasets without usable boxes
# ---------------------------------------------------------------------------------------


def test_unknown_option_and_wrong_type_are_config_errors():
    from d2kd import get_distill_cfg

    cfg = get_distill_cfg()
    with pytest.raises(AssertionError, match="Non-existent key: DISTILL.FITNET.WEIGTH"):
        cfg.merge_from_list(["DISTILL.FITNET.WEIGTH", 2.0])
    with pytest.raises(ValueError):
        cfg.merge_from_list(["DISTILL.KD.TEMPERATURE", "hot"])


def test_dataset_without_usable_boxes(tmp_path):
    """Only invalid boxes or none: a clear error with the fix, and the fix works."""
    no_boxes = voc_xml(objects=())
    zero_area = voc_xml(objects=(("cat", (6, 5, 4, 9), 0),))
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), no_boxes), "b": (jpeg_bytes(seed=2), zero_area)})
    register_voc_dataset("test_boxless_voc", root, "train", VOC_CLASSES)
    with pytest.raises(DatasetFormatError, match="FILTER_EMPTY_ANNOTATIONS False"):
        DistillTrainer.build_train_loader(tiny_train_cfg(tmp_path, "test_boxless_voc"))
    cfg = tiny_train_cfg(tmp_path, "test_boxless_voc", opts=["DATALOADER.FILTER_EMPTY_ANNOTATIONS", False])
    batch = next(iter(DistillTrainer.build_train_loader(cfg)))
    assert len(batch) == 1 and len(batch[0]["instances"]) == 0


def test_an_option_of_a_head_not_in_heads_is_named_in_a_warning(d2kd_logs):
    from d2kd import get_distill_cfg
    from d2kd.engine.preflight import unused_head_options, warn_unused_head_options

    cfg = get_distill_cfg()
    cfg.DISTILL.HEADS = ["fitnet"]
    assert unused_head_options(cfg) == []
    cfg.DISTILL.KD.TEMPERATURE = 4.0
    cfg.DISTILL.FITNET.WEIGHT = 2.0  # its head is listed: not named
    assert unused_head_options(cfg) == ["DISTILL.KD.TEMPERATURE = 4.0 (default 1.0)"]
    logs = d2kd_logs("d2kd.engine.preflight", logging.WARNING)
    warn_unused_head_options(cfg)
    messages = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert len(messages) == 1
    assert "DISTILL.KD.TEMPERATURE = 4.0 (default 1.0)" in messages[0] and "['fitnet']" in messages[0]
    cfg.DISTILL.HEADS = ["fitnet", "KD"]  # head names are case-insensitive
    assert unused_head_options(cfg) == []


def test_an_output_dir_that_cannot_be_written_is_named_with_the_fix(tmp_path):
    from d2kd.engine.preflight import check_output_dir_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = str(blocker / "run")  # a folder below a file cannot be created, even by root
    with pytest.raises(OutputDirError, match=rf"OUTPUT_DIR {out} cannot be written \(Not a directory\).*Set OUTPUT_DIR to a folder you can write"):
        check_output_dir_writable(out)
    check_output_dir_writable(str(tmp_path / "new" / "run"))  # created, and left empty
    assert os.listdir(tmp_path / "new" / "run") == []
