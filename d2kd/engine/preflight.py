"""Checks run before anything is built, so a bad setup fails in seconds with a clear message."""

import glob
import logging
import os
import tempfile
import time
from typing import List, Mapping, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "check_output_dir",
    "check_output_dir_writable",
    "warn_unused_head_options",
    "unused_head_options",
    "set_aside_previous_logs",
    "set_aside_previous_run",
    "validate_datasets",
    "OutputDirError",
    "dataset_classes",
    "teacher_classes",
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
# What else belongs to one run: a new run would overwrite some (config.yaml, even if it fails
# before its first iteration) and leave others beside its own (older checkpoints, results).
RUN_STATE_PATTERNS = (
    "config.yaml",
    "student_config.yaml",
    "student_config_d2kd.yaml",
    "model_*.pth",
    "last_checkpoint",
    "eval_results.json",
    "inference",
    "teacher_eval",
)


def check_output_dir_writable(output_dir: str):
    """
    Create ``output_dir`` if needed and write (then remove) a file in it; an :class:`OutputDirError`
    naming the folder and the fix if that fails, before any model is built.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".d2kd_write_check_"):
            pass
    except OSError as e:
        raise OutputDirError(
            f"OUTPUT_DIR {output_dir} cannot be written ({e.strerror or e}): checkpoints, logs and results go "
            "there. Set OUTPUT_DIR to a folder you can write (e.g. OUTPUT_DIR ./output/my_run on the command "
            "line), or fix that folder's permissions or free its disk."
        ) from e


def set_aside_previous_logs(output_dir: str, patterns: Sequence[str] = RUN_LOG_PATTERNS) -> Optional[str]:
    """
    Before a new (not resumed) run starts in ``output_dir``, move the logs of a previous run
    there (``metrics.json``, ``log.txt``, TensorBoard event files: Detectron2 appends to them)
    into ``output_dir/previous_runs/<time>/``, so the new run's curves and loss statistics are
    its own and the old ones are kept. This happens after ``--overwrite`` and after a run that
    failed before its first checkpoint. ``patterns``: the file names (globs) to move. Returns
    the folder, or None if there was nothing.
    """
    found = sorted({f for pattern in patterns for f in glob.glob(os.path.join(output_dir, pattern))})
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
    logger.info("Moved the previous run's files in %s to %s", output_dir, target)
    return target


def set_aside_previous_run(output_dir: str) -> Optional[str]:
    """
    :func:`set_aside_previous_logs` for everything of a previous run: its logs and its
    ``config.yaml``, checkpoints (``model_*.pth``, ``last_checkpoint``) and evaluation results,
    all into the same ``previous_runs/<time>/`` folder, so OUTPUT_DIR never mixes two runs.
    ``train_net.py`` calls it for every new run (checkpoints are only there with ``--overwrite``:
    :func:`check_output_dir` refuses otherwise).
    """
    return set_aside_previous_logs(output_dir, RUN_LOG_PATTERNS + RUN_STATE_PATTERNS)


def validate_datasets(cfg):
    """Every dataset in DATASETS.TRAIN/TEST must be registered."""
    registered = set(DatasetCatalog.list())
    for field in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[field]:
            if name not in registered:
                user = sorted(n for n in registered if not n.startswith(("coco_", "lvis_", "keypoints_", "voc_", "cityscapes_", "ade20k_")))
                raise KeyError(
                    f"Dataset '{name}' in DATASETS.{field} is not registered. Registered here: {user} "
                    "(plus Detectron2's built-in COCO/LVIS/VOC names). Declare it in the config "
                    "(DATASETS.DEFINE rows [name, voc, root, split] with DATASETS.CLASSES, or [name, "
                    "coco, json_file, image_root]), or register it with d2kd.register_voc_dataset(...) / "
                    "d2kd.register_coco_dataset(...) in the function that launch() runs: a dataset registered "
                    "by the launching script before launch() is not seen by the worker processes of a "
                    "multi-process run (--num-gpus > 1)."
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


def teacher_classes(cfg: CfgNode, teacher_cfg: CfgNode):
    """
    The teacher's class names and where they were found: ``DISTILL.TEACHER.CLASSES`` if given,
    else the ``DATASETS.CLASSES`` its config declares, else the registered datasets of its
    ``DATASETS.TRAIN``. ``(None, reason)`` when none of these knows them.
    """
    explicit = cfg.DISTILL.get("TEACHER", {}).get("CLASSES", ())
    if explicit:
        return list(explicit), "DISTILL.TEACHER.CLASSES"
    declared = list(teacher_cfg.DATASETS.get("CLASSES", ()))
    if declared:
        return declared, "the teacher config's DATASETS.CLASSES"
    classes = dataset_classes(teacher_cfg.DATASETS.TRAIN)
    if classes:
        return classes, f"the teacher's training datasets {tuple(teacher_cfg.DATASETS.TRAIN)}"
    return None, (
        f"the teacher's training datasets {tuple(teacher_cfg.DATASETS.TRAIN)} are not registered in this "
        "process and its config declares no DATASETS.CLASSES"
    )


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
    A head comparing class outputs (a head with ``needs_aligned_classes = True``, or one running
    the teacher's box or dense head) requires the same classes in the same order, and so does
    ``DISTILL.INHERIT`` when the class counts agree (it would copy the teacher's class
    predictor). The student's classes are those of its DATASETS.TRAIN; the teacher's come from
    :func:`teacher_classes`. Raises :class:`DistillConfigError` on a mismatch; when either side's
    classes cannot be known, logs a loud warning naming DISTILL.TEACHER.CLASSES as the fix.
    """
    from ..step import DistillConfigError

    inheriting = bool(cfg.DISTILL.INHERIT.ENABLED)
    if teacher_cfg is None or not (heads or inheriting):
        return
    student_classes = dataset_classes(cfg.DATASETS.TRAIN)
    teacher_names, source = teacher_classes(cfg, teacher_cfg)
    if student_classes is None or teacher_names is None:
        needing = [name for name, head in heads.items() if _needs_aligned_classes(head)]
        if needing or inheriting:
            unknown = "the student's" if student_classes is None else "the teacher's"
            why = source if teacher_names is None else f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} has no class names"
            logger.warning(
                f"CLASS ORDER NOT CHECKED: {unknown} class names are unknown ({why}). "
                f"{needing or ['DISTILL.INHERIT']} compare or copy per-class outputs and would silently learn "
                "swapped classes if the two orders differ. Set DISTILL.TEACHER.CLASSES to the teacher's class "
                "names in training order (or point DISTILL.TEACHER.CONFIG_FILE at the teacher run's config.yaml)."
            )
        return
    if student_classes == teacher_names:
        return
    if len(student_classes) == len(teacher_names):
        i = next(i for i, (s, t) in enumerate(zip(student_classes, teacher_names)) if s != t)
        difference = f"class {i} is '{teacher_names[i]}' for the teacher and '{student_classes[i]}' for the student"
    else:
        difference = f"{len(teacher_names)} teacher classes vs {len(student_classes)} student classes"
    description = (
        f"The teacher's classes ({source}) are {teacher_names}, "
        f"the student trains on {tuple(cfg.DATASETS.TRAIN)} with classes {student_classes} ({difference})"
    )
    needing = [name for name, head in heads.items() if _needs_aligned_classes(head)]
    if inheriting and len(student_classes) == len(teacher_names):
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


# ---------------------------------------------------------------------------------------
# Head options without their head.
# ---------------------------------------------------------------------------------------


def unused_head_options(cfg: CfgNode) -> List[str]:
    """
    The ``DISTILL.<HEAD>.<OPTION>`` keys that differ from their defaults for registered heads not
    in ``DISTILL.HEADS``: they change nothing, which is most often a typo in ``HEADS`` or an
    option left from another method. Each is ``"KEY = value (default d)"``.
    """
    from ..config.loader import get_distill_cfg
    from ..heads import DISTILL_HEAD_REGISTRY

    defaults = get_distill_cfg().DISTILL
    listed = {name.lower() for name in cfg.DISTILL.HEADS}
    found = []
    for name, head_class in sorted(DISTILL_HEAD_REGISTRY):
        key = head_class.config_key()
        if name.lower() in listed or key not in cfg.DISTILL or key not in defaults:
            continue
        found += _changed_leaves(cfg.DISTILL[key], defaults[key], f"DISTILL.{key}")
    return found


def _changed_leaves(node, default, prefix: str) -> List[str]:
    changed = []
    for key, value in node.items():
        default_value = default.get(key) if isinstance(default, dict) else None
        if isinstance(value, dict):
            changed += _changed_leaves(value, default_value or {}, f"{prefix}.{key}")
        elif value != default_value and not (isinstance(value, (list, tuple)) and list(value) == list(default_value or [])):
            changed.append(f"{prefix}.{key} = {value!r} (default {default_value!r})")
    return changed


def warn_unused_head_options(cfg: CfgNode):
    """Log a warning naming every option of :func:`unused_head_options`."""
    unused = unused_head_options(cfg)
    if unused:
        logger.warning(
            "These options are set for heads not in DISTILL.HEADS %s and have no effect: %s. Add the head to "
            "DISTILL.HEADS, or remove the options.",
            list(cfg.DISTILL.HEADS),
            "; ".join(unused),
        )
    return unused
