"""
The student of a d2kd run as a config plain Detectron2 reads: ``student_config.yaml``.

A run's ``config.yaml`` holds keys plain Detectron2 does not have (``DISTILL``,
``DATASETS.DEFINE``/``CLASSES``, ``MODEL.MOBILENET``), so ``get_cfg().merge_from_file``,
``DefaultPredictor``, ``tools/train_net.py --eval-only`` and ``tools/deploy/export_model.py``
refuse it. :func:`student_config` writes what the student *is* in Detectron2's own keys::

    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor
    cfg = get_cfg()
    cfg.merge_from_file("output/run/student_config.yaml")   # no set_new_allowed needed
    predictor = DefaultPredictor(cfg)

Design (what is written, and why):

- **Only Detectron2's keys, as a difference.** The file holds the keys of ``MODEL``,
  ``INPUT``, ``DATASETS``, ``TEST`` (and ``VERSION``) that exist in plain ``get_cfg()`` and whose
  value differs from its default: architecture, input format and normalisation, test sizes,
  number of classes. Training-only nodes (``SOLVER``, ``DATALOADER``, ``OUTPUT_DIR``, ``SEED``)
  are left out: the file describes the model, not the training.
- **MODEL.WEIGHTS** is ``weights``: "" (nothing) from :func:`student_config`;
  :func:`write_student_config` points it at the absolute path of ``model_final.pth`` beside the
  YAML file (the run's final checkpoint, whose ``"model"`` entry is the student, or the
  student-only copy of ``tools/export_student.py``). Override it when the folder moves.
- **Class names**: Detectron2 has no config key for them. ``MODEL.ROI_HEADS.NUM_CLASSES`` /
  ``MODEL.RETINANET.NUM_CLASSES`` are kept, and the names (``thing_classes`` of the training
  dataset, else ``DATASETS.CLASSES``) are written in the comment header, on a line
  ``# thing_classes: [...]`` (JSON) that :func:`read_class_names` reads back.
- **DATASETS.TRAIN / TEST** are kept only when every name is one Detectron2 registers itself
  (its builtin COCO / LVIS / VOC splits): those resolve in plain Detectron2, so
  ``tools/train_net.py --eval-only`` works. Other names (BCCD, datasets from
  ``DATASETS.DEFINE``) are dropped, i.e. left at Detectron2's empty default, and listed in a
  comment: plain Detectron2 could not resolve them.
- **A backbone d2kd registers** (``MODEL.BACKBONE.NAME`` ``build_mobilenetv2_*``, or any
  backbone not defined by Detectron2): plain Detectron2 has neither the builder nor its keys
  (``MODEL.MOBILENET``). ``student_config.yaml`` still holds only Detectron2's keys, with a
  comment saying ``import d2kd`` is needed; the backbone's own keys go to a second file,
  ``student_config_d2kd.yaml``, whose ``_BASE_`` is ``student_config.yaml``::

      import d2kd
      from d2kd.config import load_config
      cfg = load_config("output/run/student_config_d2kd.yaml")   # the same student

  This is the simplest design that keeps both true: the plain file merges into plain
  ``get_cfg()``, and ``d2kd.config.load_config`` of the second file reproduces the same model
  (all of ``MODEL``'s keys missing from plain Detectron2 are written there, not only those
  that differ from d2kd's defaults). Initialisation weights among them (``MODEL.MOBILENET.WEIGHTS``,
  any key named ``WEIGHTS``) are cleared: the trained weights come from ``MODEL.WEIGHTS``, and
  the ImageNet file need not exist where the student is deployed.
"""

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode, get_cfg

__all__ = [
    "D2KD_CONFIG_NAME",
    "STUDENT_CONFIG_NAME",
    "class_names",
    "detectron2_builtin_datasets",
    "read_class_names",
    "student_config",
    "student_d2kd_config",
    "write_student_config",
]

STUDENT_CONFIG_NAME = "student_config.yaml"
D2KD_CONFIG_NAME = "student_config_d2kd.yaml"
# The nodes describing the model at inference; the rest (SOLVER, DATALOADER, ...) is training.
_SECTIONS = ("MODEL", "INPUT", "DATASETS", "TEST", "VERSION")
_CLASSES_PREFIX = "# thing_classes: "


def _flatten(node, prefix="") -> Dict[str, object]:
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(value):
    """Tuples as lists, recursively (yacs accepts either; YAML writes lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nest(flat: Dict[str, object]) -> Dict:
    tree: Dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _plain(value)
    return tree


def _dump(flat: Dict[str, object]) -> str:
    return CfgNode(_nest(flat)).dump() if flat else ""


def detectron2_builtin_datasets() -> set:
    """Names of the detection datasets Detectron2 registers itself (COCO, LVIS, Pascal VOC splits)."""
    names = set()
    try:
        from detectron2.data.datasets import builtin
    except ImportError:  # pragma: no cover
        return names
    for table in ("_PREDEFINED_SPLITS_COCO", "_PREDEFINED_SPLITS_LVIS"):
        for splits in getattr(builtin, table, {}).values():
            names.update(splits)
    for year, splits in (("2007", ("trainval", "train", "val", "test")), ("2012", ("trainval", "train", "val"))):
        names.update(f"voc_{year}_{split}" for split in splits)
    return names


def class_names(cfg) -> List[str]:
    """
    The student's class names in category-id order: the ``thing_classes`` of the first training
    (else test) dataset when it is registered, else ``DATASETS.CLASSES``, else [].
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in DatasetCatalog.list():
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes:
                return list(classes)
    return list(cfg.DATASETS.get("CLASSES", []))


def read_class_names(path: str) -> List[str]:
    """The class names the ``# thing_classes:`` comment line of a student config holds ([] if none)."""
    with open(path) as f:
        for line in f:
            if line.startswith(_CLASSES_PREFIX):
                return list(json.loads(line[len(_CLASSES_PREFIX):]))
    return []


def _backbone_module(cfg) -> Optional[str]:
    """The module defining the backbone builder; None when it is Detectron2's own."""
    from detectron2.modeling import BACKBONE_REGISTRY

    name = cfg.MODEL.BACKBONE.NAME
    if name.startswith("build_mobilenetv2"):
        return "d2kd"
    try:
        module = BACKBONE_REGISTRY.get(name).__module__
    except KeyError:
        return "?"
    if module.startswith("detectron2."):
        return None
    return "d2kd" if module.split(".")[0] == "d2kd" else module


def _split(cfg, weights: str) -> Tuple[Dict, Dict, List[str]]:
    """(Detectron2 keys that differ from get_cfg(), MODEL keys plain Detectron2 lacks, dropped dataset names)."""
    default = _flatten(get_cfg())
    own = {k: v for k, v in _flatten(cfg).items() if k.split(".")[0] in _SECTIONS}
    plain = {k: v for k, v in own.items() if k in default and _plain(v) != _plain(default[k])}
    plain["VERSION"] = cfg.VERSION  # always: Detectron2 warns about a config without it
    plain.pop("MODEL.WEIGHTS", None)
    if weights != default["MODEL.WEIGHTS"]:
        plain["MODEL.WEIGHTS"] = weights
    dropped = []
    builtins = detectron2_builtin_datasets()
    for split in ("TRAIN", "TEST"):
        names = list(cfg.DATASETS.get(split, ()))
        if names and not all(n in builtins for n in names):
            dropped += names
            plain.pop(f"DATASETS.{split}", None)
            plain.pop(f"DATASETS.PROPOSAL_FILES_{split}", None)
    extra = {}
    for k, v in own.items():
        if k.startswith("MODEL.") and k not in default:
            extra[k] = "" if k.rsplit(".", 1)[-1] == "WEIGHTS" else v
    return plain, extra, dropped


def _header(cfg, extra: Dict, dropped: Sequence[str], module: Optional[str]) -> List[str]:
    lines = [
        "# The student detector, in plain Detectron2's keys (d2kd.deploy.student_config):",
        "#   cfg = detectron2.config.get_cfg(); cfg.merge_from_file(<this file>)",
        "# Only MODEL/INPUT/DATASETS/TEST keys of get_cfg() that differ from its defaults are written.",
        "# MODEL.WEIGHTS: the student's weights (\"model\" entry of model_final.pth); empty = not set.",
    ]
    names = class_names(cfg)
    lines.append("# Class names (category-id order); Detectron2 has no config key for them, set")
    lines.append("# MetadataCatalog.get(name).thing_classes to these:")
    lines.append(_CLASSES_PREFIX + json.dumps(names))
    if dropped:
        lines.append(
            "# DATASETS.TRAIN/TEST dropped (not datasets Detectron2 registers itself): " + ", ".join(dropped)
        )
    if module is not None:
        name = cfg.MODEL.BACKBONE.NAME
        if module == "d2kd":
            lines.append(f"# The backbone {name} is registered by d2kd: `import d2kd` before building the model.")
        elif module == "?":
            lines.append(f"# The backbone {name} is not registered here: import the module registering it first.")
        else:
            lines.append(f"# The backbone {name} is registered by `import {module}`: import it before building.")
        if extra:
            lines.append(
                f"# Its keys, which plain get_cfg() lacks, are in {D2KD_CONFIG_NAME} (_BASE_: this file); build with"
            )
            lines.append(f"#   import d2kd; cfg = d2kd.config.load_config(\"{D2KD_CONFIG_NAME}\")")
            lines.extend("#   " + line for line in _dump(extra).splitlines())
    return lines


def student_config(cfg, weights: str = "") -> str:
    """
    The student of ``cfg`` (a d2kd run's config) as YAML text that plain Detectron2's
    ``get_cfg().merge_from_file`` accepts without ``set_new_allowed``; MODEL.WEIGHTS is
    ``weights`` ("" : nothing). See the module docstring for what is kept.
    """
    plain, extra, dropped = _split(cfg, weights)
    lines = _header(cfg, extra, dropped, _backbone_module(cfg))
    return "\n".join(lines) + "\n" + _dump(plain)


def student_d2kd_config(cfg, base: str = STUDENT_CONFIG_NAME) -> Optional[str]:
    """
    YAML text of ``student_config_d2kd.yaml``: ``_BASE_: base`` plus the ``MODEL`` keys of a
    backbone Detectron2 does not define (``MODEL.MOBILENET``); None for Detectron2's own
    backbones (``student_config.yaml`` is then complete).
    """
    module = _backbone_module(cfg)
    _, extra, _ = _split(cfg, "")
    if module is None or not extra:
        return None
    who = "d2kd" if module in ("d2kd", "?") else module
    lines = [
        f"# The student's backbone keys that plain Detectron2 lacks, on top of {base}.",
        f"# `import {who}` first (it registers {cfg.MODEL.BACKBONE.NAME} and these keys), then",
        "#   cfg = d2kd.config.load_config(<this file>)",
        f"_BASE_: {base}",
    ]
    return "\n".join(lines) + "\n" + _dump(extra)


def write_student_config(cfg, output_dir: str, weights: Optional[str] = None) -> str:
    """
    Write ``output_dir/student_config.yaml`` (and ``student_config_d2kd.yaml`` for a backbone
    d2kd registers); the path of ``student_config.yaml``. MODEL.WEIGHTS is ``weights``, by
    default the absolute path of ``output_dir/model_final.pth``.
    """
    os.makedirs(output_dir, exist_ok=True)
    if weights is None:
        weights = os.path.join(os.path.abspath(output_dir), "model_final.pth")
    path = os.path.join(output_dir, STUDENT_CONFIG_NAME)
    _write_text(path, student_config(cfg, weights))
    extension = student_d2kd_config(cfg)
    extension_path = os.path.join(output_dir, D2KD_CONFIG_NAME)
    if extension is not None:
        _write_text(extension_path, extension)
    elif os.path.isfile(extension_path):  # left over from another student
        os.remove(extension_path)
    return path


def _write_text(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
