"""
The ``cfg.DISTILL`` node.

Every registered distillation head adds its own options under ``cfg.DISTILL.<NAME>``
(``NAME`` is the head's registry name in upper case) through its ``add_config`` class
method, so unknown keys and wrong types are rejected by the usual yacs merge, as
everywhere in Detectron2. Registering a head registers its ``add_config`` here as a config
extension (``d2kd.heads.base``), and so does importing a backbone d2kd defines: this module
imports neither the heads nor the backbones.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_distill_config", "register_config_extension", "uses_teacher"]

# Functions adding config keys: the registered heads' options, d2kd's backbones and a user's own
# modules (a registered backbone, ...), applied in the order they were registered.
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
    # Datasets declared in the config (d2kd.data.config_datasets), registered by train_net.py in
    # every process: rows [name, "voc", root, split] or [name, "coco", json_file, image_root] ...
    _C.DATASETS.DEFINE = []
    # ... and the VOC datasets' class names, in category-id order.
    _C.DATASETS.CLASSES = []
    # True: decode every training image in full before training (a progress bar; one error lists
    # every unreadable file). False: only each image's header is checked (VOC datasets).
    _C.DATALOADER.DECODE_CHECK = False
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
    # The teacher's class names in its training order, when its training datasets are not
    # registered in this process and its config declares no DATASETS.CLASSES: heads that compare
    # per-class outputs check them against the student's (empty: found from the teacher's config).
    _C.DISTILL.TEACHER.CLASSES = []
    # Scale of the teacher's input relative to the student's (2.0: the teacher sees the
    # image at twice the student's resolution, the low-resolution student of Chen et al.).
    _C.DISTILL.TEACHER.INPUT_SCALE = 1.0
    # The precision of the frozen teacher's forward: "" follows the training step (fp32, or
    # SOLVER.AMP's autocast); "fp32" always full precision; "bf16" / "fp16" under autocast of that
    # dtype on the teacher's device, also without AMP. The heads always receive fp32 teacher records.
    _C.DISTILL.TEACHER.PRECISION = ""
    # Detectron2's yacs defaults have no SOLVER.AMP.PRECISION (only its LazyConfig's AMPTrainer
    # takes one): "float16" (with a gradient scaler) or "bfloat16" on CUDA; a CPU uses bfloat16.
    if "PRECISION" not in _C.SOLVER.AMP:
        _C.SOLVER.AMP.PRECISION = "float16"

    # Distillation losses are off for the first WARMUP_ITERS iterations ...
    _C.DISTILL.WARMUP_ITERS = 0
    # ... and from STOP_ITER on (-1: never stop).
    _C.DISTILL.STOP_ITER = -1
    # Automatic loss balance (d2kd.modeling.loss_balance): "off" keeps the paper weights;
    # "initial" measures each head's total and the detector loss over the first ITERS iterations
    # with distillation on, then fixes one multiplier per head so that its total is TARGET x the
    # detector loss (capped at MAX_MULTIPLIER when > 0). A head's own term weights are unchanged.
    # While measuring, the heads' terms are multiplied by MEASURE_MULTIPLIER: 0 measures them
    # without training on them; 1 trains with the paper weights meanwhile. docs/usage.md explains
    # the default TARGET and why MODE is off by default.
    _C.DISTILL.LOSS_BALANCE = CN()
    _C.DISTILL.LOSS_BALANCE.MODE = "off"
    _C.DISTILL.LOSS_BALANCE.TARGET = 0.5
    _C.DISTILL.LOSS_BALANCE.ITERS = 20
    _C.DISTILL.LOSS_BALANCE.MAX_MULTIPLIER = 0.0
    _C.DISTILL.LOSS_BALANCE.MEASURE_MULTIPLIER = 0.0
    # Evaluate the teacher once and report it beside the student ("teacher/" metrics).
    _C.DISTILL.EVAL_TEACHER = False

    # FGD's "inheriting strategy" (docs/methods/inherit.md): a new run (not a resumed
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
    Add the ``DISTILL`` node, every registered head's options and every registered config
    extension (d2kd's backbones, your own modules) to ``cfg`` (in place). ``import d2kd``
    registers the built-in heads and backbones.
    """
    if "DISTILL" not in cfg:
        _add_base_distill_config(cfg)
    for add_config in list(_CONFIG_EXTENSIONS):
        add_config(cfg)
    return cfg
