"""FGFI, fine-grained feature imitation (docs/methods/fgfi.md): the head and its imitation mask."""

from .head import FGFI
from .imitation_mask import anchor_source, imitation_mask

__all__ = ["FGFI", "anchor_source", "imitation_mask"]
