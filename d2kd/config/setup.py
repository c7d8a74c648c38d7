"""Former home of the config loader; everything here now lives in :mod:`d2kd.config.loader`."""

from .loader import get_distill_cfg, load_config_file, resolve_config_file  # noqa: F401
