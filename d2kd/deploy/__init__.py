"""
From a d2kd run to a deployable student: ``student_config.yaml`` for plain Detectron2
(:mod:`~d2kd.deploy.student_config`) and the TorchScript / ONNX export with its checks and
deploy card (:mod:`~d2kd.deploy.export`, used by ``tools/export_student.py``).
"""

from .student_config import (
    D2KD_CONFIG_NAME,
    STUDENT_CONFIG_NAME,
    read_class_names,
    student_config,
    student_d2kd_config,
    write_student_config,
)
from .export import ExportResult, check_run_dir, deploy_card, export_student

__all__ = [k for k in globals().keys() if not k.startswith("_")]
