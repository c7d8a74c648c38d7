"""
Box-level geometry on feature maps, shared by the heads that weight features by objects
(FGFI, DeFeat, FGD, Global Knowledge, HGD).

- Box-to-level rule (methods.md 0.2): ``lvl = floor(4 + log2(sqrt(area) / 224))`` clamped to
  the available levels, Detectron2's ``assign_boxes_to_levels``; equivalent to mmdet's
  ``map_roi_levels`` (finest_scale 56).
- Box windows on a stride-``s`` map: cells ``[floor(x1/s), floor(x2/s)+1) x [floor(y1/s),
  floor(y2/s)+1)``, so a box always covers at least one cell (the DeFeat/GK convention).
"""

import math
from typing import Sequence, Tuple

import torch

__all__ = ["assign_boxes_to_levels", "box_windows", "box_mask", "box_value_mask"]


def assign_boxes_to_levels(
    boxes: torch.Tensor, min_level: int = 2, max_level: int = 6, canonical_box_size: int = 224, canonical_level: int = 4
) -> torch.Tensor:
    """
    FPN level of each box ``(N, 4)`` in XYXY image coordinates, as an integer tensor in
    ``[min_level, max_level]`` (Lin et al. 2017, FPN Eq. 1).
    """
    sizes = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    eps = torch.finfo(sizes.dtype).eps if sizes.is_floating_point() else 1e-8
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + eps))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64)


def box_windows(boxes: torch.Tensor, stride: float, feature_hw: Tuple[int, int]) -> torch.Tensor:
    """Integer cell windows ``(N, 4)`` = ``(x0, y0, x1, y1)``, end-exclusive, clipped to the map."""
    h, w = feature_hw
    x0 = torch.floor(boxes[:, 0] / stride).clamp(0, w - 1)
    y0 = torch.floor(boxes[:, 1] / stride).clamp(0, h - 1)
    x1 = (torch.floor(boxes[:, 2] / stride) + 1).clamp(1, w)
    y1 = (torch.floor(boxes[:, 3] / stride) + 1).clamp(1, h)
    x1 = torch.maximum(x1, x0 + 1)
    y1 = torch.maximum(y1, y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


def box_value_mask(
    boxes: torch.Tensor, values: torch.Tensor, stride: float, feature_hw: Tuple[int, int], reduce: str = "max"
) -> torch.Tensor:
    """
    An ``(H, W)`` map holding ``values[i]`` inside box ``i``'s window, 0 elsewhere.

    ``reduce``: how overlapping boxes combine: ``"max"`` (FGD's scale mask), or
    ``"overwrite"`` (later boxes win: the Global Knowledge code's order-dependent mask).
    """
    if reduce not in ("max", "overwrite"):
        raise ValueError(f"reduce must be 'max' or 'overwrite', got {reduce!r}")
    mask = torch.zeros(feature_hw, dtype=torch.float32, device=boxes.device)
    for (x0, y0, x1, y1), value in zip(box_windows(boxes, stride, feature_hw).tolist(), values.tolist()):
        region = mask[y0:y1, x0:x1]
        mask[y0:y1, x0:x1] = torch.clamp(region, min=value) if reduce == "max" else value
    return mask


def box_mask(boxes: torch.Tensor, stride: float, feature_hw: Tuple[int, int]) -> torch.Tensor:
    """Binary ``(H, W)`` union of the boxes' windows."""
    return box_value_mask(boxes, torch.ones(len(boxes)), stride, feature_hw)
