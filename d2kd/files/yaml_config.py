"""
YAML configs read without running code: ``yaml.SafeLoader`` only, ``_BASE_`` chains with cycle
detection, and errors that name the file.

Detectron2's ``CfgNode.merge_from_file`` falls back to ``yaml.unsafe_load`` when a file holds a
Python tag (``!!python/object/apply:...``), which runs the Python the tag names. d2kd reads
every YAML config through :func:`load_yaml_with_base` instead and merges the result with
:func:`merge_yaml_file`.
"""

import os
from typing import Any, Dict, List, Sequence

import yaml
from detectron2.utils.file_io import PathManager

from .errors import ConfigFileError, UnsafeFileError

__all__ = ["read_yaml", "load_yaml_with_base", "merge_yaml_file", "BASE_KEY"]

BASE_KEY = "_BASE_"

# Detectron2's model zoo writes RetinaNet's anchor sizes (configs/Base-RetinaNet.yaml) as
# ``!!python/object/apply:eval`` of this expression: it is read as the value it computes,
# without evaluating anything. Every other Python tag is refused.
_ZOO_EXPRESSIONS = {
    "[[x, x * 2**(1.0/3), x * 2**(2.0/3) ] for x in [32, 64, 128, 256, 512 ]]": [
        [x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)] for x in [32, 64, 128, 256, 512]
    ],
}


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that names the file, line and tag of a Python tag, and reads ``!!python/tuple``."""

    path = ""


def _python_tag(loader: _ConfigLoader, suffix: str, node):
    if suffix == "tuple" and isinstance(node, yaml.SequenceNode):
        return tuple(loader.construct_sequence(node))  # a plain value, no object built
    if suffix == "object/apply:eval" and isinstance(node, yaml.SequenceNode):
        arguments = loader.construct_sequence(node)
        if len(arguments) == 1 and arguments[0] in _ZOO_EXPRESSIONS:
            return _ZOO_EXPRESSIONS[arguments[0]]
    mark = node.start_mark
    raise UnsafeFileError(
        f"{loader.path}, line {mark.line + 1}, column {mark.column + 1}: the YAML tag '!!python/{suffix}' "
        "would run Python code when loaded; d2kd reads configs as plain data and refused the file (nothing "
        "was run). Replace the tagged value by a plain YAML value (a number, string, list or mapping); if the "
        "file came from elsewhere, do not use it without reading it."
    )


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/", _python_tag)


def read_yaml(path: str) -> Dict[str, Any]:
    """
    The mapping in the YAML file ``path`` (``{}`` for an empty file), read with a safe loader.
    Raises :class:`UnsafeFileError` for a Python tag and :class:`ConfigFileError` for a file that
    is not UTF-8, not YAML or not a mapping; each names the file and the place.
    """
    with PathManager.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigFileError(
            f"{path} is not UTF-8 text: byte offset {e.start} (0x{raw[e.start]:02x}) cannot be decoded. "
            "Save the config as UTF-8 (most editors: 'Save with encoding')."
        ) from None
    loader = _ConfigLoader(text)
    loader.path = path
    try:
        data = loader.get_single_data()
    except yaml.constructor.ConstructorError as e:
        raise UnsafeFileError(
            f"{path}: {e.problem} {e.problem_mark or ''}; d2kd reads configs as plain YAML data (no custom "
            "tags). Replace the tagged value by a plain YAML value."
        ) from None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{path} is not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} holds a YAML {type(data).__name__}, not a mapping of config keys.")
    return data


def _merge_into(source: Dict, target: Dict, path: str):
    """Merge ``source`` into ``target``, ``source`` winning (Detectron2's ``_BASE_`` rule)."""
    for key, value in source.items():
        if isinstance(value, dict) and key in target:
            if not isinstance(target[key], dict):
                raise ConfigFileError(f"{path}: key '{key}' is a mapping here but a value in its _BASE_.")
            _merge_into(value, target[key], path)
        else:
            target[key] = value


def _base_path(config_file: str, base: str) -> str:
    base = os.path.expanduser(base)
    if base.startswith(("/", "https://", "http://")):
        return base
    return os.path.join(os.path.dirname(config_file), base)


def load_yaml_with_base(path: str, _chain: Sequence[str] = ()) -> Dict[str, Any]:
    """
    The config of ``path`` with its ``_BASE_`` files merged in (relative bases resolve against
    the folder of the file naming them, as in Detectron2), every file read by
    :func:`read_yaml`. A ``_BASE_`` chain that comes back to a file raises
    :class:`ConfigFileError` naming the chain.
    """
    key = os.path.realpath(path) if "://" not in path else path
    chain: List[str] = list(_chain) + [path]
    if key in [os.path.realpath(p) if "://" not in p else p for p in _chain]:
        raise ConfigFileError(
            "The _BASE_ chain loops: " + " -> ".join(chain) + ". Remove the _BASE_ entry that names a file "
            "already in the chain."
        )
    if "://" not in path and not os.path.isfile(path):
        named_by = f" (the _BASE_ of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"Config file not found: {path}{named_by}.")
    data = read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if not bases:
        return data
    merged: Dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        _merge_into(load_yaml_with_base(_base_path(path, base), chain), merged, path)
    _merge_into(data, merged, path)
    return merged


def merge_yaml_file(cfg, path: str):
    """
    Merge the YAML config ``path`` (with its ``_BASE_`` chain) into the Detectron2 ``CfgNode``
    ``cfg``, as ``cfg.merge_from_file`` does (an older config ``VERSION`` is upgraded) but
    reading the files with :func:`load_yaml_with_base`.
    """
    from detectron2.config.compat import downgrade_config, guess_version, upgrade_config

    loaded = type(cfg)(load_yaml_with_base(path))
    version = loaded.get("VERSION", None)
    if version is None:
        version = guess_version(loaded, path)
    if version > cfg.VERSION:
        raise ConfigFileError(f"{path} is a v{version} config; this Detectron2 reads up to v{cfg.VERSION}.")
    if version == cfg.VERSION:
        cfg.merge_from_other_cfg(loaded)
        return cfg
    old = downgrade_config(cfg, to_version=version)
    old.merge_from_other_cfg(loaded)
    upgraded = upgrade_config(old)
    cfg.clear()
    cfg.update(upgraded)
    return cfg
