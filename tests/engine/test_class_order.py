"""The class-order check when the teacher's training data is not registered in the distillation process."""

import logging

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd.config import get_distill_cfg
from d2kd.engine.preflight import check_class_alignment, teacher_classes
from d2kd.step import DistillConfigError


class _Head:
    teacher_parts = {"roi_box"}


def _cfgs(student_dataset, teacher_dataset):
    student, teacher = get_distill_cfg(), get_distill_cfg()
    student.DATASETS.TRAIN = (student_dataset,)
    teacher.DATASETS.TRAIN = (teacher_dataset,)
    return student, teacher


@pytest.fixture
def preflight_warnings(d2kd_logs):
    return d2kd_logs("d2kd.engine.preflight", logging.WARNING)


@pytest.fixture(scope="module", autouse=True)
def student_dataset():
    if "class_order_student" not in DatasetCatalog.list():
        DatasetCatalog.register("class_order_student", lambda: [])
        MetadataCatalog.get("class_order_student").set(thing_classes=["RBC", "WBC", "Platelets"])


def test_unregistered_teacher_data_warns_loudly(preflight_warnings):
    student, teacher = _cfgs("class_order_student", "teacher_data_elsewhere")
    check_class_alignment(student, teacher, {"kd": _Head()})
    (message,) = [r.getMessage() for r in preflight_warnings.records if "CLASS ORDER NOT CHECKED" in r.getMessage()]
    assert "teacher_data_elsewhere" in message and "DISTILL.TEACHER.CLASSES" in message and "kd" in message


def test_explicit_teacher_classes_catch_a_swapped_order():
    student, teacher = _cfgs("class_order_student", "teacher_data_elsewhere")
    student.DISTILL.TEACHER.CLASSES = ["RBC", "Platelets", "WBC"]
    assert teacher_classes(student, teacher) == (["RBC", "Platelets", "WBC"], "DISTILL.TEACHER.CLASSES")
    with pytest.raises(DistillConfigError, match=r"DISTILL\.TEACHER\.CLASSES.*class 1 is 'Platelets' for the teacher"):
        check_class_alignment(student, teacher, {"kd": _Head()})
    student.DISTILL.TEACHER.CLASSES = ["RBC", "WBC", "Platelets"]
    check_class_alignment(student, teacher, {"kd": _Head()})  # same order: fine


def test_classes_declared_in_the_teacher_config_are_used():
    student, teacher = _cfgs("class_order_student", "teacher_data_elsewhere")
    teacher.DATASETS.CLASSES = ["WBC", "RBC", "Platelets"]
    with pytest.raises(DistillConfigError, match=r"teacher config's DATASETS\.CLASSES.*class 0 is 'WBC'"):
        check_class_alignment(student, teacher, {"kd": _Head()})
