"""FGD, focal and global distillation (docs/methods/fgd.md): the head, its losses and its GcBlock."""

from .focal_global import fgd_attention_loss, fgd_feature_loss, fgd_global_loss
from .gc_block import GlobalContextBlock
from .head import FGD, fgd_masks

__all__ = ["FGD", "fgd_masks", "fgd_attention_loss", "fgd_feature_loss", "fgd_global_loss", "GlobalContextBlock"]
