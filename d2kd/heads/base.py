"""
The distillation head interface and its registry.

A head is an ``nn.Module`` that turns what the student and the teacher recorded in one
training step into named loss terms. Its trainable parts (adapters, non-local blocks, ...)
are submodules, so they are optimised and checkpointed with it; the teacher is never one
of its submodules.

To add a method, subclass :class:`DistillHead`, register it and name it in a config::

    @DISTILL_HEAD_REGISTRY.register()
    class MyHead(DistillHead):
        @classmethod
        def add_config(cls, cfg):
            cfg.DISTILL.MYHEAD = CN({"WEIGHT": 1.0})
        def __init__(self, cfg, context):
            super().__init__(cfg, context)
            self.student_modules = ["backbone"]; self.teacher_parts = {"backbone"}
        def forward(self, student, teacher, step):
            return {"p2": ...}            # logged as loss_kd_myhead_p2

    # YAML: DISTILL: {HEADS: ["MyHead"], MYHEAD: {WEIGHT: 2.0}}
"""

from typing import Dict, List, Set

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
    """

    def __init__(self, cfg: CfgNode, context: BuildContext):
        super().__init__()
        self.name = type(self).registry_name()
        self.student_modules: List[str] = []
        self.student_methods: List[str] = []
        self.teacher_modules: List[str] = []
        self.teacher_methods: List[str] = []
        self.teacher_parts: Set[str] = set()

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
    def options(cls, cfg: CfgNode) -> CfgNode:
        return cfg.DISTILL[cls.config_key()]

    def build_hooks(self, trainer) -> List:
        """
        Detectron2 ``HookBase`` objects this head needs (e.g. periodic prototype updates);
        the trainer registers them after its own. State that must survive a resume belongs
        in buffers or parameters of the head, which are checkpointed under ``"distiller"``.
        """
        return []

    def forward(self, student, teacher, step: StepInputs) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


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
