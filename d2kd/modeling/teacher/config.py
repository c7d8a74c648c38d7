"""
The teacher's config: a Detectron2 YAML config or a LazyConfig (``.py``), from
``DISTILL.TEACHER.CONFIG_FILE`` or from the run folder of ``DISTILL.TEACHER.WEIGHTS``.
"""

import logging
import os
from typing import Optional, Tuple

from detectron2.config import CfgNode

from ...config.loader import check_key_value_pairs, get_distill_cfg, load_config
from ...files import UnsafeFileError
from .weights import TeacherWeightsError

__all__ = [
    "build_teacher_cfg",
    "resolve_teacher_config",
    "teacher_run_config",
    "is_lazy_config",
    "load_lazy_teacher_config",
    "lazy_teacher_cfg",
]

logger = logging.getLogger(__name__)

# What a teacher's weights fix: a config that disagrees on these cannot describe them.
_ARCHITECTURE_KEYS = ("MODEL.META_ARCHITECTURE", "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")
# What the teacher was trained on (for the class-order check), taken from its run when it differs.
_DATA_KEYS = ("DATASETS.TRAIN", "DATASETS.CLASSES", "DATASETS.DEFINE")


def teacher_run_config(weights: str) -> Optional[str]:
    """The ``config.yaml`` of the run folder that holds ``weights`` (a local file), if there is one."""
    if not weights or "://" in weights:
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.yaml")
    return path if os.path.isfile(path) else None


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's own config (see :func:`resolve_teacher_config`)."""
    return resolve_teacher_config(cfg)[0]


def resolve_teacher_config(cfg: CfgNode) -> Tuple[CfgNode, Optional[object]]:
    """
    The teacher's own config, on the student's device, and for a LazyConfig teacher the
    LazyConfig its model is instantiated from (None for a YAML teacher); the file is read once.

    The config is ``DISTILL.TEACHER.CONFIG_FILE`` (a path or a model-zoo name) when given, else
    the ``config.yaml`` of the run folder holding ``DISTILL.TEACHER.WEIGHTS`` (a teacher trained
    with command-line overrides is described by its run's config, not by the YAML it started
    from). When both exist and disagree on the architecture or the class count, the error names
    the run's ``config.yaml`` as the fix; the datasets the weights were trained on are taken
    from the run.
    """
    run_config = teacher_run_config(cfg.DISTILL.TEACHER.WEIGHTS)
    config_file = cfg.DISTILL.TEACHER.CONFIG_FILE or run_config
    if not config_file:
        raise TeacherWeightsError(
            "DISTILL.TEACHER.CONFIG_FILE is empty and DISTILL.TEACHER.WEIGHTS "
            f"({cfg.DISTILL.TEACHER.WEIGHTS or 'empty'}) lies in no run folder with a config.yaml: "
            "set DISTILL.TEACHER.CONFIG_FILE to the teacher's config (a path or a model-zoo name)."
        )
    if not cfg.DISTILL.TEACHER.CONFIG_FILE:
        logger.info(f"Teacher config: {run_config} (the run folder of DISTILL.TEACHER.WEIGHTS).")
    if is_lazy_config(config_file):
        lazy = load_lazy_teacher_config(config_file, cfg.DISTILL.TEACHER.OPTS)
        return lazy_teacher_cfg(cfg, lazy), lazy
    teacher_cfg = load_config(
        config_file,
        cfg.DISTILL.TEACHER.OPTS,
        role="teacher config (DISTILL.TEACHER.CONFIG_FILE)",
        opts_name="DISTILL.TEACHER.OPTS",
    )
    teacher_cfg.defrost()
    if run_config and cfg.DISTILL.TEACHER.CONFIG_FILE:
        _reconcile_with_run(teacher_cfg, run_config, cfg.DISTILL.TEACHER.CONFIG_FILE)
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    teacher_cfg.DISTILL.HEADS = []
    teacher_cfg.freeze()
    return teacher_cfg, None


def _get(cfg: CfgNode, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, CfgNode) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _reconcile_with_run(teacher_cfg: CfgNode, run_config: str, config_file: str):
    try:
        run = load_config(run_config, role="teacher run config")
    except UnsafeFileError:
        raise  # a run folder holding a config that would run code is not used at all
    except Exception as e:  # noqa: BLE001  a run config of another code base: nothing to compare
        logger.warning(f"Could not read the teacher's run config {run_config} ({e}); using {config_file} as given.")
        return
    differences = [
        f"{key}: {_get(teacher_cfg, key)} in {config_file}, {_get(run, key)} in {run_config}"
        for key in _ARCHITECTURE_KEYS
        if _get(teacher_cfg, key) != _get(run, key)
    ]
    if differences:
        raise TeacherWeightsError(
            f"The teacher config does not describe the teacher's weights, whose run folder says otherwise: "
            f"{'; '.join(differences)}. Set DISTILL.TEACHER.CONFIG_FILE to {run_config} (or leave it empty to "
            "use the run's config), or fix DISTILL.TEACHER.OPTS."
        )
    for key in _DATA_KEYS:
        value = _get(run, key)
        if value is not None and _get(teacher_cfg, key) != value:
            logger.info(f"Teacher {key} taken from its run {run_config}: {value} (the data its weights learnt).")
            node = teacher_cfg
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value


def is_lazy_config(config_file: str) -> bool:
    """A Detectron2 LazyConfig (a ``.py`` file or model-zoo name) rather than a YAML config."""
    return str(config_file).endswith(".py")


def load_lazy_teacher_config(config_file: str, opts=()):
    """
    A LazyConfig teacher (e.g. the zoo's ``new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py``): a
    path or a model-zoo name, with ``DISTILL.TEACHER.OPTS`` applied as ``key value`` pairs of
    LazyConfig keys (``model.roi_heads.num_classes 3``).

    A LazyConfig is Python, and loading it runs it: d2kd loads one only when the user names it in
    ``DISTILL.TEACHER.CONFIG_FILE``, never one found beside the weights (that is always a YAML
    ``config.yaml``, read as plain data).
    """
    from detectron2.config import LazyConfig

    path = config_file
    if not os.path.isfile(path):
        from detectron2 import model_zoo

        try:
            path = model_zoo.get_config_file(config_file)
        except Exception:  # model_zoo raises RuntimeError for unknown names
            path = ""
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(
                f"The teacher LazyConfig '{config_file}' (DISTILL.TEACHER.CONFIG_FILE) is neither a file nor a "
                "Detectron2 model-zoo name such as 'new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py'."
            )
    opts = list(opts)
    check_key_value_pairs(opts, "DISTILL.TEACHER.OPTS")  # before the LazyConfig (code) runs
    lazy = LazyConfig.load(path)
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in zip(opts[::2], opts[1::2])]
    return LazyConfig.apply_overrides(lazy, overrides) if overrides else lazy


def lazy_teacher_cfg(cfg: CfgNode, lazy) -> CfgNode:
    """
    The CfgNode d2kd reads about a LazyConfig teacher: its input format and normalisation,
    class count and training datasets (the class-order check); the model itself is
    instantiated from the LazyConfig by :func:`~d2kd.modeling.teacher.build_teacher`.
    """
    teacher_cfg = get_distill_cfg()
    model = lazy.model
    teacher_cfg.INPUT.FORMAT = model.get("input_format", teacher_cfg.INPUT.FORMAT)
    teacher_cfg.MODEL.PIXEL_MEAN = [float(x) for x in model.get("pixel_mean", teacher_cfg.MODEL.PIXEL_MEAN)]
    teacher_cfg.MODEL.PIXEL_STD = [float(x) for x in model.get("pixel_std", teacher_cfg.MODEL.PIXEL_STD)]
    roi_heads = model.get("roi_heads", None)
    if roi_heads is not None and roi_heads.get("num_classes", None) is not None:
        teacher_cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(roi_heads.num_classes)
    if model.get("num_classes", None) is not None:
        teacher_cfg.MODEL.RETINANET.NUM_CLASSES = int(model.num_classes)
    try:
        names = lazy.dataloader.train.dataset.names
        teacher_cfg.DATASETS.TRAIN = (names,) if isinstance(names, str) else tuple(names)
    except AttributeError:
        pass
    teacher_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_cfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    teacher_cfg.freeze()
    return teacher_cfg
