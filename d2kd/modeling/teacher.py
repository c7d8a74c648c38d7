"""
The teacher: built from its own Detectron2 config, loaded strictly, frozen, and run only as
far as the heads need.
"""

import contextlib
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Set

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from ..capture import Recorder, Records
from ..config.loader import get_distill_cfg, load_config

__all__ = [
    "build_teacher_cfg",
    "teacher_run_config",
    "build_teacher",
    "load_teacher_weights",
    "load_reporting_mismatches",
    "format_mismatches",
    "read_checkpoint_file",
    "TeacherRunner",
    "TEACHER_PRECISIONS",
    "teacher_autocast",
    "cast_floating",
    "TeacherWeightsError",
    "CheckpointFileError",
]

logger = logging.getLogger(__name__)


class TeacherWeightsError(RuntimeError):
    """The teacher's weights are missing or do not match its architecture."""


class CheckpointFileError(RuntimeError):
    """A weights or checkpoint file exists but cannot be read (truncated, empty, not a checkpoint)."""


def read_checkpoint_file(read, path: str, option: str, advice: Optional[Callable[[], str]] = None):
    """
    ``read(path)`` (a checkpointer's ``_load_file``). A file that cannot be read (torch's
    ``PytorchStreamReader failed``, ``EOFError``, an unpickling error...) raises
    :class:`CheckpointFileError` naming ``path``, the config key or role ``option`` it came from
    (e.g. ``"DISTILL.TEACHER.WEIGHTS"``) and what to do: ``advice()`` if given (called only
    then), else to copy the file again or set ``option`` to another one.
    """
    try:
        return read(path)
    except Exception as e:
        raise CheckpointFileError(
            f"{option} {path} cannot be read as a checkpoint ({type(e).__name__}: {e}). The file is damaged "
            "(truncated by an interrupted copy or a full disk, empty) or not a PyTorch/Detectron2 checkpoint. "
            + (advice() if advice else f"Copy the file again or set {option} to another checkpoint.")
        ) from e


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


def _get(cfg: CfgNode, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, CfgNode) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def build_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """
    The teacher's own config, on the student's device. ``DISTILL.TEACHER.CONFIG_FILE`` (a path
    or a model-zoo name) when given, else the ``config.yaml`` of the run folder holding
    ``DISTILL.TEACHER.WEIGHTS`` (a teacher trained with command-line overrides is described by
    its run's config, not by the YAML it started from). When both exist and disagree on the
    architecture or the class count, the error names the run's ``config.yaml`` as the fix; the
    datasets the weights were trained on are taken from the run.
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
        return lazy_teacher_cfg(cfg, load_lazy_teacher_config(config_file, cfg.DISTILL.TEACHER.OPTS))
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
    return teacher_cfg


def _reconcile_with_run(teacher_cfg: CfgNode, run_config: str, config_file: str):
    try:
        run = load_config(run_config, role="teacher run config")
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


def load_teacher_weights(teacher: nn.Module, weights: str, strict: bool = True):
    """
    Load ``weights`` into ``teacher``. Missing file: error. Missing, unexpected or
    wrongly shaped parameters: error when ``strict`` (the default), logged otherwise.
    A teacher is never left with random weights silently.
    """
    if not weights:
        raise TeacherWeightsError(
            "DISTILL.TEACHER.WEIGHTS is empty: d2kd will not distil from a randomly initialised "
            "teacher. Train the teacher first (python train_net.py --config-file <teacher.yaml>) "
            "and set DISTILL.TEACHER.WEIGHTS to its model_final.pth."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise TeacherWeightsError(
            f"Teacher weights file not found: {weights}. Set DISTILL.TEACHER.WEIGHTS to a trained "
            "teacher checkpoint (e.g. output/<teacher>/model_final.pth)."
        )
    problems = load_reporting_mismatches(teacher, weights, option="DISTILL.TEACHER.WEIGHTS")
    if problems:
        message = (
            f"Teacher weights {weights} do not match the teacher architecture: {format_mismatches(problems)}. Check "
            "DISTILL.TEACHER.CONFIG_FILE is the config the weights were trained with"
        )
        if strict:
            raise TeacherWeightsError(message + ", or set DISTILL.TEACHER.STRICT_LOAD False to load partially.")
        logger.warning(message + " (partial loading allowed by DISTILL.TEACHER.STRICT_LOAD False).")


def load_reporting_mismatches(model: nn.Module, weights: str, option: str = "Weights file") -> Dict[str, List[str]]:
    """
    Load ``weights`` into ``model`` with Detectron2's checkpointer (which loads what fits) and
    return what did not fit: ``{"missing" | "unexpected" | "wrong shape": [keys]}``, only the
    non-empty kinds. The strict checks of the teacher and of the tools' students build on it.
    An unreadable file raises :class:`CheckpointFileError` naming ``option`` (its config key).
    """
    checkpointer = _ReportingCheckpointer(model)
    checkpointer.option = option
    checkpointer.load(weights)
    incompatible = checkpointer.incompatible
    problems = {
        "missing": list(incompatible.missing_keys),
        "unexpected": list(incompatible.unexpected_keys),
        "wrong shape": [k for k, _, _ in getattr(incompatible, "incorrect_shapes", [])],
    }
    return {k: v for k, v in problems.items() if v}


def format_mismatches(problems: Dict[str, List[str]]) -> str:
    """``kind (count): [first keys]`` per kind, for an error message."""
    return "; ".join(f"{k} ({len(v)}): {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())


class _ReportingCheckpointer(DetectionCheckpointer):
    """Keeps the missing/unexpected/mis-shaped keys of the last load for the strict check;
    an unreadable file is an error naming ``option``."""

    incompatible = None
    option = "Weights file"

    def _load_file(self, f):
        return read_checkpoint_file(super()._load_file, f, self.option)

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def is_lazy_config(config_file: str) -> bool:
    """A Detectron2 LazyConfig (a ``.py`` file or model-zoo name) rather than a YAML config."""
    return str(config_file).endswith(".py")


def load_lazy_teacher_config(config_file: str, opts=()):
    """
    A LazyConfig teacher (e.g. the zoo's ``new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py``): a
    path or a model-zoo name, with ``DISTILL.TEACHER.OPTS`` applied as ``key value`` pairs of
    LazyConfig keys (``model.roi_heads.num_classes 3``).
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
    lazy = LazyConfig.load(path)
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"DISTILL.TEACHER.OPTS must be key value pairs, got {opts}.")
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in zip(opts[::2], opts[1::2])]
    return LazyConfig.apply_overrides(lazy, overrides) if overrides else lazy


def lazy_teacher_cfg(cfg: CfgNode, lazy) -> CfgNode:
    """
    The CfgNode d2kd reads about a LazyConfig teacher: its input format and normalisation,
    class count and training datasets (the class-order check); the model itself is
    instantiated from the LazyConfig by :func:`build_teacher`.
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


def build_teacher(cfg: CfgNode) -> nn.Module:
    """
    Build, load and freeze the teacher described by ``cfg.DISTILL.TEACHER``: from a YAML config,
    or instantiated from a LazyConfig (``.py``), and loaded strictly either way.
    """
    teacher_cfg = build_teacher_cfg(cfg)
    if is_lazy_config(cfg.DISTILL.TEACHER.CONFIG_FILE):
        from detectron2.config import instantiate

        lazy = load_lazy_teacher_config(cfg.DISTILL.TEACHER.CONFIG_FILE, cfg.DISTILL.TEACHER.OPTS)
        teacher = instantiate(lazy.model).to(torch.device(cfg.MODEL.DEVICE))
    else:
        teacher = build_model(teacher_cfg)
    load_teacher_weights(teacher, cfg.DISTILL.TEACHER.WEIGHTS, cfg.DISTILL.TEACHER.STRICT_LOAD)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.d2kd_cfg = teacher_cfg
    logger.info(f"Teacher loaded from {cfg.DISTILL.TEACHER.WEIGHTS} ({cfg.DISTILL.TEACHER.CONFIG_FILE}).")
    return teacher


# DISTILL.TEACHER.PRECISION -> the teacher's autocast dtype ("": the step's own precision).
TEACHER_PRECISIONS = {
    "": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def teacher_autocast(precision: str, device_type: str):
    """
    The context the teacher's forward runs in for ``DISTILL.TEACHER.PRECISION``: the step's
    own (``""``), autocast off (``"fp32"``), or autocast in bf16 / fp16 on ``device_type``.
    """
    key = str(precision).strip().lower()
    if key not in TEACHER_PRECISIONS:
        raise ValueError(
            f"DISTILL.TEACHER.PRECISION {precision!r} is not a precision; choose one of "
            f"{sorted(k for k in TEACHER_PRECISIONS if k)} or \"\" (the training step's)."
        )
    dtype = TEACHER_PRECISIONS[key]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


def cast_floating(obj: Any, dtype: torch.dtype = torch.float32) -> Any:
    """
    ``obj`` with every floating tensor in it cast to ``dtype`` (tensors, dicts, lists, tuples,
    ``Boxes``, ``Instances``, ``ImageList``); other values are returned as they are. Casting a
    tensor already of ``dtype`` returns it (no copy).
    """
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        return type(obj)((k, cast_floating(v, dtype)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(cast_floating(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floating(v, dtype) for v in obj)
    if isinstance(obj, Boxes):
        return type(obj)(cast_floating(obj.tensor, dtype))
    if isinstance(obj, ImageList):
        return ImageList(cast_floating(obj.tensor, dtype), obj.image_sizes)
    if isinstance(obj, Instances):
        out = Instances(obj.image_size)
        for k, v in obj.get_fields().items():
            out.set(k, cast_floating(v, dtype))
        return out
    return obj


def _records_to_float32(records: Records) -> Records:
    """The teacher's records with their floating tensors in fp32 (what every head expects)."""
    data = records._data  # Records has no public iteration; it is d2kd's own type
    return Records({k: [cast_floating(entry, torch.float32) for entry in entries] for k, entries in data.items()})


class TeacherRunner:
    """
    Runs only the teacher parts the heads need, under ``no_grad`` and in eval mode, on the
    same batch as the student, with the teacher's own pixel mean/std and channel order.

    The forward runs in ``precision`` (``DISTILL.TEACHER.PRECISION``, :func:`teacher_autocast`);
    whatever it ran in, the records handed to the heads hold fp32 tensors.

    Args:
        teacher: the frozen teacher.
        parts: subset of ``{"backbone", "rpn", "roi_box", "dense"}``.
        recorder: the teacher's recorder (hooks on the modules the heads read).
        student_input_format: the channel order of ``batched_inputs["image"]``.
        input_scale: teacher input resolution / student input resolution.
        precision: ``DISTILL.TEACHER.PRECISION`` ("" | "fp32" | "bf16" | "fp16").
    """

    def __init__(
        self,
        teacher: nn.Module,
        parts: Set[str],
        recorder: Recorder,
        student_input_format: str,
        input_scale: float = 1.0,
        precision: str = "",
    ):
        self.teacher = teacher
        self.parts = set(parts)
        if self.parts & {"rpn", "roi_box", "dense"}:
            self.parts.add("backbone")
        self.recorder = recorder
        self.flip_channels = _needs_channel_flip(student_input_format, getattr(teacher, "input_format", student_input_format))
        self.input_scale = float(input_scale)
        teacher_autocast(precision, "cpu")  # validates the option at build time
        self.precision = precision

    @property
    def needs_student_records(self) -> bool:
        """True when the teacher reads the student's step (its box head on the student's RoIs)."""
        return "roi_box" in self.parts

    def preprocess(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise with the teacher's statistics and pad with its size divisibility."""
        teacher = self.teacher
        images = []
        for x in batched_inputs:
            image = x["image"].to(teacher.pixel_mean.device)
            if self.flip_channels:
                image = image.flip(0)
            image = (image - teacher.pixel_mean) / teacher.pixel_std
            if self.input_scale != 1.0:
                image = F.interpolate(image[None], scale_factor=self.input_scale, mode="bilinear", align_corners=False)[0]
            images.append(image)
        return ImageList.from_tensors(
            images,
            teacher.backbone.size_divisibility,
            padding_constraints=getattr(teacher.backbone, "padding_constraints", None),
        )

    @torch.no_grad()
    def __call__(self, batched_inputs: List[dict], student_records: Optional[Records]):
        """Returns ``(teacher records, teacher ImageList)``; empty records if no part is needed."""
        if not self.parts:
            return Records({}), None
        teacher = self.teacher
        teacher.eval()  # re-applied every step: a trainer's train() must never reach it
        images = self.preprocess(batched_inputs)
        with self.recorder.recording(), teacher_autocast(self.precision, images.tensor.device.type):
            features = teacher.backbone(images.tensor)
            if "rpn" in self.parts:
                rpn = teacher.proposal_generator
                teacher_rpn_features = [features[f] for f in rpn.in_features]
                rpn.anchor_generator(teacher_rpn_features)
                rpn.rpn_head(teacher_rpn_features)
            if "roi_box" in self.parts:
                self._run_box_head_on_student_proposals(features, student_records)
            if "dense" in self.parts:
                self._run_dense_head(features)
        return _records_to_float32(self.recorder.pop()), images

    def _run_dense_head(self, features):
        """A one-stage teacher (RetinaNet): its dense head and anchors, no decoding or NMS."""
        teacher = self.teacher
        dense_features = [features[f] for f in teacher.head_in_features]
        teacher.anchor_generator(dense_features)
        teacher.head(dense_features)

    def _run_box_head_on_student_proposals(self, features, student_records: Records):
        """Chen et al. 2017 / design note: RoI logits correspond one to one with the student's."""
        roi_heads = self.teacher.roi_heads
        proposals = student_records.output("roi_heads.label_and_sample_proposals")
        boxes = [p.proposal_boxes for p in proposals]
        if self.input_scale != 1.0:
            boxes = [Boxes(b.tensor * self.input_scale) for b in boxes]
        box_features = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
        box_features = roi_heads.box_head(box_features)
        roi_heads.box_predictor(box_features)


def _needs_channel_flip(student_format: str, teacher_format: str) -> bool:
    formats = {student_format, teacher_format}
    if student_format == teacher_format:
        return False
    if formats == {"RGB", "BGR"}:
        return True
    raise ValueError(
        f"Cannot feed a teacher expecting {teacher_format} images from a student loader producing "
        f"{student_format}; d2kd converts between RGB and BGR only."
    )
