"""Checks run before anything is built, so a bad setup fails in seconds with a clear message."""

import glob
import logging
import os
import time
from typing import List, Mapping, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config.loader import ConfigOptionError, merge_config  # noqa: F401  (their old home)

__all__ = [
    "check_output_dir",
    "set_aside_previous_logs",
    "validate_datasets",
    "OutputDirError",
    "ConfigOptionError",
    "merge_config",
    "dataset_classes",
    "check_class_alignment",
]

logger = logging.getLogger(__name__)


class OutputDirError(RuntimeError):
    pass


def check_output_dir(cfg, overwrite: bool = False):
    """Refuse to train a new run into an OUTPUT_DIR that holds another run's checkpoints."""
    out = cfg.OUTPUT_DIR
    previous = glob.glob(os.path.join(out, "model_*.pth")) + glob.glob(os.path.join(out, "last_checkpoint"))
    if previous and not overwrite:
        raise OutputDirError(
            f"OUTPUT_DIR {out} already holds a previous run ({os.path.basename(sorted(previous)[0])}, ...). "
            "Pass --resume to continue it, --overwrite to start over in place, or set OUTPUT_DIR to a new folder."
        )


# What Detectron2 appends to rather than replaces: a new run would mix its records with them.
RUN_LOG_PATTERNS = ("metrics.json", "log.txt", "log.txt.rank*", "events.out.tfevents.*")


def set_aside_previous_logs(output_dir: str) -> Optional[str]:
    """
    Before a new (not resumed) run starts in ``output_dir``, move the logs of a previous run
    there (``metrics.json``, ``log.txt``, TensorBoard event files: Detectron2 appends to them)
    into ``output_dir/previous_runs/<time>/``, so the new run's curves and loss statistics are
    its own and the old ones are kept. This happens after ``--overwrite`` and after a run that
    failed before its first checkpoint. Returns the folder, or None if there was nothing.
    """
    found = sorted({f for pattern in RUN_LOG_PATTERNS for f in glob.glob(os.path.join(output_dir, pattern))})
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(os.path.getmtime(f) for f in found)))
    target = os.path.join(output_dir, "previous_runs", stamp)
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(output_dir, "previous_runs", f"{stamp}-{suffix}")
        suffix += 1
    os.makedirs(target)
    for f in found:
        os.replace(f, os.path.join(target, os.path.basename(f)))
    logger.info("Moved the previous run's logs in %s to %s", output_dir, target)
    return target


def validate_datasets(cfg):
    """Every dataset in DATASETS.TRAIN/TEST must be registered."""
    registered = set(DatasetCatalog.list())
    for field in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[field]:
            if name not in registered:
                user = sorted(n for n in registered if not n.startswith(("coco_", "lvis_", "keypoints_", "voc_", "cityscapes_", "ade20k_")))
                raise KeyError(
                    f"Dataset '{name}' in DATASETS.{field} is not registered. Registered here: {user} "
                    "(plus Detectron2's built-in COCO/LVIS/VOC names). Register your data with "
                    "d2kd.register_voc_dataset(...) or d2kd.register_coco_dataset(...) before training."
                )


# ---------------------------------------------------------------------------------------
# Teacher and student classes.
# ---------------------------------------------------------------------------------------


def dataset_classes(names: Sequence[str]) -> Optional[List[str]]:
    """``thing_classes`` of the first registered dataset of ``names`` that has them, else None."""
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            continue
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


def _needs_aligned_classes(head) -> bool:
    """
    A head compares per-class outputs if it says so (``needs_aligned_classes``), or if it runs
    the teacher's class predictors (its box head, or a one-stage teacher's dense head).
    """
    flag = getattr(head, "needs_aligned_classes", None)
    if flag is not None:
        return bool(flag)
    return bool({"roi_box", "dense"} & set(getattr(head, "teacher_parts", ())))


def check_class_alignment(cfg: CfgNode, teacher_cfg: Optional[CfgNode], heads: Mapping[str, object]):
    """
    Best effort: when both the student's and the teacher's DATASETS.TRAIN name registered
    datasets with ``thing_classes``, a head comparing class outputs (a head with
    ``needs_aligned_classes = True``, or one running the teacher's box or dense head) requires the same
    classes in the same order, and so does ``DISTILL.INHERIT`` when the class counts agree (it
    would copy the teacher's class predictor). Raises :class:`DistillConfigError`; only logs
    otherwise.
    """
    from ..step import DistillConfigError

    inheriting = bool(cfg.DISTILL.INHERIT.ENABLED)
    if teacher_cfg is None or not (heads or inheriting):
        return
    student_classes = dataset_classes(cfg.DATASETS.TRAIN)
    teacher_classes = dataset_classes(teacher_cfg.DATASETS.TRAIN)
    if student_classes is None or teacher_classes is None or student_classes == teacher_classes:
        return
    if len(student_classes) == len(teacher_classes):
        i = next(i for i, (s, t) in enumerate(zip(student_classes, teacher_classes)) if s != t)
        difference = f"class {i} is '{teacher_classes[i]}' for the teacher and '{student_classes[i]}' for the student"
    else:
        difference = f"{len(teacher_classes)} teacher classes vs {len(student_classes)} student classes"
    description = (
        f"The teacher was trained on {tuple(teacher_cfg.DATASETS.TRAIN)} with classes {teacher_classes}, "
        f"the student trains on {tuple(cfg.DATASETS.TRAIN)} with classes {student_classes} ({difference})"
    )
    needing = [name for name, head in heads.items() if _needs_aligned_classes(head)]
    if inheriting and len(student_classes) == len(teacher_classes):
        needing.append("DISTILL.INHERIT (the teacher's class predictor)")
    if needing:
        raise DistillConfigError(
            f"{description}. {needing} compare or copy class outputs, which needs the same classes in "
            "the same order: use a teacher trained on the student's classes (or register the student's "
            "dataset with the teacher's class order), or use feature heads only."
        )
    logger.warning(f"{description}. Only feature heads are used, so distillation proceeds.")


# ---------------------------------------------------------------------------------------
# Training data.
# ---------------------------------------------------------------------------------------


def get_train_dataset_dicts(cfg: CfgNode) -> List[dict]:
    """
    Detectron2's ``get_detection_dataset_dicts`` for DATASETS.TRAIN; an empty dataset, or one
    left empty by DATALOADER.FILTER_EMPTY_ANNOTATIONS, raises ``DatasetFormatError`` with the fix.
    """
    from detectron2.data import get_detection_dataset_dicts

    from ..data.mapper import DatasetFormatError

    names = tuple(cfg.DATASETS.TRAIN)
    if not names:
        raise DatasetFormatError("DATASETS.TRAIN is empty: name at least one registered dataset to train on.")
    try:
        return get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    except AssertionError as e:
        text = str(e)
        if "is empty" in text:
            raise DatasetFormatError(
                f"{text} Its loader returned no images: check the dataset's path, split file or "
                "annotation json, and that it lists images."
            ) from e
        if "No valid data" in text:
            raise DatasetFormatError(
                f"No image of DATASETS.TRAIN {names} has a usable (non-crowd) box, and "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS True drops images without one. Check the annotations "
                "(class names, boxes), or set DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on them anyway."
            ) from e
        raise
