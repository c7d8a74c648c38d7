"""
The distillation head interface and its registry.

A head is an ``nn.Module`` that turns what the student and the teacher recorded in one
training step into named loss terms. Its trainable parts (adapters, non-local blocks, ...)
are submodules, so they are optimised and checkpointed with it; the teacher is never one
of its submodules.

A head is built with Detectron2's ``@configurable`` convention: ``__init__`` takes explicit
keyword arguments, and ``from_config(cfg, context)`` turns ``cfg.DISTILL.<NAME>`` and a
:class:`BuildContext` into them. ``Head(cfg, context)`` (what :func:`build_distill_heads`
calls) goes through ``from_config``; tests and Python users can skip the config::

    from d2kd.heads.fitnet import FitNet
    from d2kd.heads.kd import KD
    from d2kd.modeling.feature_pairs import FeaturePairing

    fitnet = FitNet(pairing=FeaturePairing(student, teacher, ["p2", "p3"]), weight=1.0)
    kd = KD(student=student, teacher=teacher, temperature=2.0)  # models are read, not kept

Heads that size modules from the models take the built :class:`FeaturePairing`; heads that
check or read the detectors' structure (RoI/RPN/dense outputs) take ``student``/``teacher``.
``__init__`` checks the option values (so both ways of building are checked), raising
:class:`DistillConfigError` with the name of the config key; ``from_config`` only reads the config.

To add a method, subclass :class:`DistillHead`, register it and name it in a config::

    @DISTILL_HEAD_REGISTRY.register()
    class MyHead(DistillHead):
        @classmethod
        def add_config(cls, cfg):
            cfg.DISTILL.MYHEAD = CN({"WEIGHT": 1.0})

        @configurable
        def __init__(self, *, weight: float = 1.0):
            super().__init__()
            self.weight = weight
            self.student_modules = ["backbone"]; self.teacher_modules = ["backbone"]
            self.teacher_parts = {"backbone"}

        @classmethod
        def from_config(cls, cfg, context):
            return {"weight": cls.options(cfg, context).WEIGHT}

        def forward(self, student, teacher, step):
            return {"p2": ...}            # logged as loss_kd_myhead_p2

    # YAML: DISTILL: {HEADS: ["MyHead"], MYHEAD: {WEIGHT: 2.0}}

A feature-imitation method on FPN levels that differs from the others only in its loss
subclasses :class:`~d2kd.heads.feature_imitation.FeatureImitationHead` instead.
"""

from typing import Dict, List, Optional, Set

import torch
from detectron2.config import CfgNode
from detectron2.utils.registry import Registry
from torch import nn

from ..config.defaults import register_config_extension
from ..step import TEACHER_PARTS, BuildContext, DistillConfigError, StepInputs

__all__ = [
    "DISTILL_HEAD_REGISTRY",
    "DistillHead",
    "BuildContext",
    "StepInputs",
    "TEACHER_PARTS",
    "build_distill_heads",
    "DistillConfigError",
]

class _HeadRegistry(Registry):
    """Detectron2's registry; registering a head also registers its config options."""

    def _do_register(self, name, obj):
        super()._do_register(name, obj)
        register_config_extension(obj.add_config)


DISTILL_HEAD_REGISTRY = _HeadRegistry("DISTILL_HEAD")
DISTILL_HEAD_REGISTRY.__doc__ = """
Registry of distillation heads. A registered class is a :class:`DistillHead`; the names in
``cfg.DISTILL.HEADS`` select them, and its options live in ``cfg.DISTILL.<NAME.upper()>``.
"""


class DistillHead(nn.Module):
    """
    Base class of distillation heads.

    Subclasses set, in ``__init__``, what must be recorded:

    - ``student_modules`` / ``teacher_modules``: module paths whose outputs are recorded;
    - ``student_methods`` / ``teacher_methods``: method paths whose return values are recorded
      (e.g. ``roi_heads.label_and_sample_proposals``);
    - ``teacher_parts``: which parts of the teacher must run (subset of ``TEACHER_PARTS``).

    ``forward(student, teacher, step)`` returns a dict ``term -> scalar``; the term ``""``
    is the head's single loss. Terms are logged as ``loss_kd_<name>[_<term>]``.

    ``warmup_iters``: a head with a warm-up of its own (e.g. FGFI's, on top of
    ``DISTILL.WARMUP_ITERS``) sets it; the distillation model gives the head zero terms before
    that iteration without calling it, ``DISTILL.LOSS_BALANCE`` measures the head only once it
    distils and ``--check`` steps at an iteration where it does.
    """

    # Which levels an empty IN_FEATURES means (detector_levels): "rpn" (the levels the
    # proposal generator or the dense head reads), "roi" (the RoI heads' levels) or "stages"
    # (the backbone's bottom-up stages, then the "rpn" levels).
    LEVEL_SOURCE = "rpn"

    def __init__(self):
        super().__init__()
        self.name = type(self).registry_name()
        self.student_modules: List[str] = []
        self.student_methods: List[str] = []
        self.teacher_modules: List[str] = []
        self.teacher_methods: List[str] = []
        self.teacher_parts: Set[str] = set()
        self.warmup_iters = 0

    def capture_pairing(self, pairing, extra_student_modules=()):
        """Record what ``pairing`` (a :class:`~d2kd.modeling.feature_pairs.FeaturePairing`) reads:
        its student and teacher features; the teacher runs its backbone (and FPN) only."""
        self.student_modules = list(pairing.student_modules) + list(extra_student_modules)
        self.teacher_modules = list(pairing.teacher_modules)
        self.teacher_parts = {"backbone"}

    @classmethod
    def registry_name(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def config_key(cls) -> str:
        """The node ``cfg.DISTILL.<key>`` holding this head's options."""
        return cls.__name__.upper()

    @classmethod
    def add_config(cls, cfg: CfgNode):
        """Add this head's defaults under ``cfg.DISTILL.<config_key()>``. Override."""
        raise NotImplementedError(f"{cls.__name__} must define add_config(cfg)")

    @classmethod
    def options(cls, cfg: CfgNode, context: Optional[BuildContext] = None) -> CfgNode:
        """
        ``cfg.DISTILL.<config_key()>``. With a ``context``, a copy in which every empty
        ``IN_FEATURES`` (also in sub-nodes) is the levels the student's detector reads
        (:func:`detector_levels` with this head's ``LEVEL_SOURCE``), so ``HEADS: ["cwd"]`` works on
        a Faster R-CNN (p2..p6), a Mask R-CNN or a RetinaNet (p3..p7) alike.
        """
        node = cfg.DISTILL[cls.config_key()]
        if context is None:
            return node
        node = node.clone()
        _fill_empty_in_features(node, lambda: detector_levels(context.student, cls.LEVEL_SOURCE))
        return node

    def build_hooks(self, trainer) -> List:
        """
        Detectron2 ``HookBase`` objects this head needs (e.g. periodic prototype updates);
        the trainer registers them after its own. State that must survive a resume belongs
        in buffers or parameters of the head, which are checkpointed under ``"distiller"``.
        """
        return []

    def forward(self, student, teacher, step: StepInputs) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


LEVEL_SOURCES = ("rpn", "roi", "stages")


def _by_stride(shapes) -> List[str]:
    return sorted(shapes, key=lambda name: shapes[name].stride)


def detector_levels(student, source: str = "rpn") -> List[str]:
    """
    The feature levels ``student``'s detector head reads: a RetinaNet's ``head_in_features``;
    for a two-stage detector its RPN's ``in_features`` (``source`` "rpn") or its RoI heads'
    (``source`` "roi"); else every backbone output. ``source`` "stages" puts the backbone's
    bottom-up stages (e.g. res2..res5) before the "rpn" levels.
    """
    if source not in LEVEL_SOURCES:
        raise ValueError(f"Unknown level source {source!r}; one of {LEVEL_SOURCES}.")
    if source == "stages":
        bottom_up = getattr(getattr(student, "backbone", None), "bottom_up", None)
        stages = _by_stride(bottom_up.output_shape()) if bottom_up is not None else []
        return stages + [name for name in detector_levels(student, "rpn") if name not in stages]
    if getattr(student, "head_in_features", None):  # a one-stage DenseDetector (RetinaNet)
        return list(student.head_in_features)
    roi_heads, rpn = getattr(student, "roi_heads", None), getattr(student, "proposal_generator", None)
    ordered = (roi_heads, rpn) if source == "roi" else (rpn, roi_heads)
    for module in ordered:
        if module is not None and getattr(module, "in_features", None):
            return list(module.in_features)
    return _by_stride(student.backbone.output_shape())


def _fill_empty_in_features(node: CfgNode, levels):
    """Set every empty ``IN_FEATURES`` under ``node`` to ``levels()`` (called only when one is empty)."""
    for key, value in node.items():
        if isinstance(value, CfgNode):
            _fill_empty_in_features(value, levels)
        elif key == "IN_FEATURES" and not value:
            node[key] = list(levels())


def _lookup_head_class(name: str):
    for registered_name, head_class in DISTILL_HEAD_REGISTRY:
        if registered_name.lower() == name.lower():
            return head_class
    registered = sorted(n.lower() for n, _ in DISTILL_HEAD_REGISTRY)
    raise DistillConfigError(
        f"Unknown distillation head '{name}' in DISTILL.HEADS. Registered heads: {registered}. "
        "A head of your own must be registered with @DISTILL_HEAD_REGISTRY.register() in a "
        "module imported before the trainer is built."
    )


def build_distill_heads(cfg: CfgNode, context: BuildContext) -> nn.ModuleDict:
    """Build the heads named in ``cfg.DISTILL.HEADS``, validating their configs now."""
    heads = nn.ModuleDict()
    for name in cfg.DISTILL.HEADS:
        head_class = _lookup_head_class(name)
        head = head_class(cfg, context)
        unknown_parts = set(head.teacher_parts) - set(TEACHER_PARTS)
        if unknown_parts:
            raise DistillConfigError(
                f"Head '{name}' asks the teacher for {sorted(unknown_parts)}; known parts: {TEACHER_PARTS}."
            )
        if head.name in heads:
            raise DistillConfigError(f"Head '{name}' is listed twice in DISTILL.HEADS.")
        heads[head.name] = head
    return heads
