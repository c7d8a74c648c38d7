"""FBKD, structured knowledge distillation (docs/methods/fbkd.md): the head and its non-local block."""

from .head import FBKD, default_non_local_setting, fbkd_channel_mask, fbkd_spatial_mask
from .non_local import NON_LOCAL_NORMS, NonLocalBlock

__all__ = [
    "FBKD",
    "default_non_local_setting",
    "fbkd_channel_mask",
    "fbkd_spatial_mask",
    "NON_LOCAL_NORMS",
    "NonLocalBlock",
]
