"""
The ``cfg.DISTILL`` node.

Every registered distillation head adds its own options under ``cfg.DISTILL.<NAME>``
(``NAME`` is the head's registry name in upper case) through its ``add_config`` class
method, so unknown keys and wrong types are rejected by the usual yacs merge, as
everywhere in Detectron2.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_distill_config", "register_config_extension", "uses_teacher"]

# Functions adding the config keys of a user's own modules (a registered backbone, ...).
_CONFIG_EXTENSIONS = []


def register_config_extension(add_config):
    """
    Make every config d2kd builds (the student's, and the teacher's loaded from
    DISTILL.TEACHER.CONFIG_FILE) carry the keys ``add_config(cfg)`` adds: the options of your
    own registered backbone or module. Usable as a decorator; call it when your module is
    imported, before the config is merged (see docs/custom_backbone.md)::

        @register_config_extension
        def add_mynet_config(cfg):
            cfg.MODEL.MYNET = CN({"WIDTH": 32})
    """
    if add_config not in _CONFIG_EXTENSIONS:
        _CONFIG_EXTENSIONS.append(add_config)
    return add_config


def _add_base_distill_config(cfg: CN):
    _C = cfg
    _C.DISTILL = CN()
    # Names of heads in DISTILL_HEAD_REGISTRY; empty = train a plain detector.
    _C.DISTILL.HEADS = []

    _C.DISTILL.TEACHER = CN()
    # A config file path, or a Detectron2 model-zoo name such as
    # "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml".
    _C.DISTILL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights (a path). Required: d2kd never distils from a random
    # teacher.
    _C.DISTILL.TEACHER.WEIGHTS = ""
    # KEY VALUE overrides applied to the teacher's config after loading it.
    _C.DISTILL.TEACHER.OPTS = []
    # Fail when the weights miss or have extra parameters. Set False to load partially
    # (a report of what is missing is still logged).
    _C.DISTILL.TEACHER.STRICT_LOAD = True
    # Scale of the teacher's input relative to the student's (2.0: the teacher sees the
    # image at twice the student's resolution, the low-resolution student of Chen et al.).
    _C.DISTILL.TEACHER.INPUT_SCALE = 1.0

    # Distillation losses are off for the first WARMUP_ITERS iterations ...
    _C.DISTILL.WARMUP_ITERS = 0
    # ... and from STOP_ITER on (-1: never stop).
    _C.DISTILL.STOP_ITER = -1
    # Evaluate the teacher once and report it beside the student ("teacher/" metrics).
    _C.DISTILL.EVAL_TEACHER = False

    # FGD's "inheriting strategy" (methods.md 5, init_student=True): a new run (not a resumed
    # one) starts the student's neck and heads from the teacher's parameters of the same name
    # and shape (d2kd.modeling.inherit). Works with or without DISTILL.HEADS.
    _C.DISTILL.INHERIT = CN()
    _C.DISTILL.INHERIT.ENABLED = False
    # state_dict key prefixes to copy: the FPN (which Detectron2 keeps in model.backbone beside
    # backbone.bottom_up), the RPN, the RoI heads, and RetinaNet's head.
    _C.DISTILL.INHERIT.PREFIXES = ["backbone.fpn_", "backbone.top_block.", "proposal_generator.", "roi_heads.", "head."]


def uses_teacher(cfg: CN) -> bool:
    """Whether ``cfg`` trains with a teacher: distillation heads, or inheriting its parameters."""
    return bool(cfg.DISTILL.HEADS) or bool(cfg.DISTILL.INHERIT.ENABLED)


def add_distill_config(cfg: CN) -> CN:
    """
    Add the ``DISTILL`` node and every registered head's options to ``cfg`` (in place).

    Heads registered after this call add their options by calling
    ``HeadClass.add_config(cfg)`` themselves.
    """
    from d2kd.heads import DISTILL_HEAD_REGISTRY  # imports the built-in heads
    from d2kd.modeling.backbone import add_mobilenet_config

    add_mobilenet_config(cfg)
    for add_config in _CONFIG_EXTENSIONS:
        add_config(cfg)
    if "DISTILL" not in cfg:
        _add_base_distill_config(cfg)
    for _, head_class in sorted(DISTILL_HEAD_REGISTRY):
        head_class.add_config(cfg)
    return cfg
