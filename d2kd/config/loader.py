"""
The one config loader of d2kd: ``train_net.py``, the teacher, the tools and the benchmarks all
build their configs here.

- :func:`get_distill_cfg`: Detectron2's defaults plus the ``DISTILL`` node;
- :func:`load_config`: a config from a file path or a Detectron2 model-zoo name, then KEY VALUE
  options; an unknown key or a wrong type raises :class:`ConfigOptionError` naming the source
  and the closest keys;
- relative paths a YAML file names (:data:`PATH_KEYS`, e.g. ``DISTILL.TEACHER.CONFIG_FILE``)
  resolve against the folder of the YAML file that names them, like ``_BASE_``, and then
  against the working directory, so the shipped configs work from any working directory.
"""

import difflib
import os
from typing import Dict, List, Optional, Sequence

from detectron2.config import CfgNode, get_cfg

from ..files.yaml_config import merge_yaml_file, read_yaml
from .defaults import add_distill_config

__all__ = [
    "ConfigOptionError",
    "PATH_KEYS",
    "check_key_value_pairs",
    "get_distill_cfg",
    "load_config",
    "merge_config",
    "resolve_config_file",
]

# Config keys holding a file path. A relative path in a YAML file is resolved against that
# file's folder when it names an existing file there, else it is left to the working directory
# (model-zoo names and URLs are left as they are). The paths in DATASETS.DEFINE rows resolve
# the same way.
PATH_KEYS = ("DISTILL.TEACHER.CONFIG_FILE", "DISTILL.TEACHER.WEIGHTS", "MODEL.WEIGHTS", "MODEL.MOBILENET.WEIGHTS")


class ConfigOptionError(ValueError):
    """An unknown config key or a value of the wrong type, with the likely intended key."""


def get_distill_cfg() -> CfgNode:
    """Detectron2's default config plus the DISTILL node."""
    return add_distill_config(get_cfg())


def resolve_config_file(name: str, role: str = "config") -> str:
    """
    Return a readable path for ``name``: an existing file, or a Detectron2 model-zoo config
    name (e.g. ``COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml``).
    """
    if not name:
        raise FileNotFoundError(f"No {role} file given.")
    if os.path.isfile(name):
        return name
    try:
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(name)
    except Exception:  # model_zoo raises RuntimeError for unknown names
        path = None
    if path and os.path.isfile(path):
        return path
    raise FileNotFoundError(
        f"The {role} '{name}' is neither an existing file nor a Detectron2 model-zoo config "
        "name (e.g. 'COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml'). Check the path; a relative "
        "path in a YAML file is resolved against that file's folder, then against the working "
        f"directory {os.getcwd()}."
    )


def load_config(config_file: str, opts: Sequence = (), role: str = "config", opts_name: str = "") -> CfgNode:
    """
    A config with the DISTILL node, merged from ``config_file`` (a path or a model-zoo name),
    then from the KEY VALUE list ``opts``. Errors name the file by ``role`` (e.g. "teacher
    config (DISTILL.TEACHER.CONFIG_FILE)") and the options by ``opts_name`` (e.g.
    "DISTILL.TEACHER.OPTS"; default: the command-line options).
    """
    cfg = get_distill_cfg()
    merge_config(cfg, resolve_config_file(config_file, role), opts, role=role, opts_name=opts_name)
    return cfg


def merge_config(
    cfg: CfgNode, config_file: Optional[str] = None, opts: Sequence = (), role: str = "", opts_name: str = ""
) -> CfgNode:
    """
    ``config_file`` read as plain data (:func:`d2kd.files.yaml_config.merge_yaml_file`: no YAML
    tag runs code), relative paths resolved (:data:`PATH_KEYS`), then
    ``cfg.merge_from_list(opts)``; an unknown key or a wrong type raises
    :class:`ConfigOptionError` naming the source and the closest keys.
    """
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file not found: {config_file} (working directory {os.getcwd()}).")
        source = f"{role} file {config_file}" if role else f"config file {config_file}"
        try:
            merge_yaml_file(cfg, config_file)
        except (KeyError, AssertionError, ValueError) as e:
            translated = _translate(cfg, e, source)
            if translated is e:
                raise
            raise translated from e
        _resolve_relative_paths(cfg, config_file)
    if opts:
        source = opts_name or "the command-line options"
        check_key_value_pairs(opts, source)
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError, ValueError) as e:
            translated = _translate(cfg, e, source)
            if translated is e:
                raise
            raise translated from e
    return cfg


def check_key_value_pairs(opts: Sequence, source: str):
    """``opts`` must be a KEY VALUE list: an odd length is a :class:`ConfigOptionError` naming ``source`` and the list."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigOptionError(
            f"{source} must be a list of KEY VALUE pairs, but it has {len(opts)} entries: {opts}. A key lacks its "
            f"value (or a value its key); the last entry is {opts[-1]!r}."
        )


# ---------------------------------------------------------------------------------------
# Relative paths, resolved like _BASE_.
# ---------------------------------------------------------------------------------------


def _nested_get(node: Dict, dotted_key: str):
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _base_files(config_file: str, raw: Dict) -> List[str]:
    """The ``_BASE_`` files of ``raw``, as Detectron2 resolves them."""
    bases = raw.get("_BASE_") or []
    if isinstance(bases, str):
        bases = [bases]
    resolved = []
    for base in bases:
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(config_file), base)
        resolved.append(base)
    return resolved


def _path_values(config_file: str) -> Dict[str, str]:
    """
    For each key of PATH_KEYS set in ``config_file`` or its bases, the value the merge gives
    it, with a relative path joined to the folder of the file that set it when it names an
    existing file there.
    """
    raw = read_yaml(config_file)
    values = {}
    for base in _base_files(config_file, raw):
        if os.path.isfile(base):
            values.update(_path_values(base))
    folder = os.path.dirname(os.path.abspath(config_file))
    for key in PATH_KEYS:
        value = _nested_get(raw, key)
        if isinstance(value, str):
            values[key] = _beside(folder, value)
    rows = _nested_get(raw, "DATASETS.DEFINE")
    if isinstance(rows, list):  # [name, format, path, path or split]: the paths resolve too
        values["DATASETS.DEFINE"] = [
            [row[0], row[1]] + [_beside(folder, x) if isinstance(x, str) else x for x in row[2:]]
            if isinstance(row, list) and len(row) == 4
            else row
            for row in rows
        ]
    return values


def _beside(folder: str, value: str) -> str:
    """``value`` joined to ``folder`` when that names an existing file or folder, else unchanged."""
    candidate = os.path.join(folder, os.path.expanduser(value))
    if value and not os.path.isabs(value) and "://" not in value and os.path.exists(candidate):
        return os.path.normpath(candidate)
    return value


def _resolve_relative_paths(cfg: CfgNode, config_file: str):
    for key, value in _path_values(config_file).items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, CfgNode) else None
        if isinstance(node, CfgNode) and leaf in node:
            frozen = node.is_frozen()
            node.defrost()
            node[leaf] = value
            if frozen:
                node.freeze()


# ---------------------------------------------------------------------------------------
# Config keys: unknown keys and wrong types, with the key the user probably meant.
# ---------------------------------------------------------------------------------------


def _flat_keys(cfg: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, CfgNode):
            keys += _flat_keys(v, full + ".")
    return keys


def _unknown_key_message(cfg: CfgNode, key: str, source: str) -> str:
    keys = _flat_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    parts = key.split(".")
    siblings = []
    for depth in range(len(parts) - 1, 0, -1):
        node = cfg
        try:
            for p in parts[:depth]:
                node = node[p]
        except KeyError:
            continue
        if isinstance(node, CfgNode):
            siblings = sorted(f"{'.'.join(parts[:depth])}.{k}" for k in node.keys())
            break
    message = f"Unknown config key {key} in {source}."
    if close:
        message += f" Did you mean {' or '.join(close)}?"
    if siblings:
        shown = siblings[:20] + (["..."] if len(siblings) > 20 else [])
        message += f" Keys at that level: {shown}."
    if parts[0] == "DISTILL" and len(parts) > 2:
        message += (
            " Head options live in DISTILL.<HEAD> and exist only for registered heads: a head of "
            "your own must be imported (registered) before the config is built."
        )
    return message


def _translate(cfg: CfgNode, error: Exception, source: str) -> Exception:
    text = str(error.args[0]) if error.args else str(error)
    for marker in ("Non-existent config key: ", "Non-existent key: "):
        if marker in text:
            key = text.split(marker, 1)[1].strip().strip("'\"")
            return ConfigOptionError(_unknown_key_message(cfg, key, source))
    if text.startswith("Type mismatch"):
        return ConfigOptionError(f"{text} (in {source}). Give the value in the type of the default.")
    return error
