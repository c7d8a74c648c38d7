"""d2kd's configs: the ``DISTILL`` node (``defaults``) and the one loader (``loader``)."""

from .defaults import add_distill_config, register_config_extension, uses_teacher
from .loader import (
    PATH_KEYS,
    ConfigOptionError,
    get_distill_cfg,
    load_config,
    merge_config,
    resolve_config_file,
)

__all__ = [
    "PATH_KEYS",
    "ConfigOptionError",
    "add_distill_config",
    "get_distill_cfg",
    "load_config",
    "merge_config",
    "register_config_extension",
    "resolve_config_file",
    "uses_teacher",
]
