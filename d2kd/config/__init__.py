from .defaults import add_distill_config
from .setup import get_distill_cfg, load_config_file

__all__ = ["add_distill_config", "get_distill_cfg", "load_config_file"]
