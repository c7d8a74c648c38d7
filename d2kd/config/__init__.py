from .defaults import add_distill_config, register_config_extension, uses_teacher
from .setup import get_distill_cfg, load_config_file

__all__ = ["add_distill_config", "get_distill_cfg", "load_config_file", "register_config_extension", "uses_teacher"]
