"""
Box-level geometry on feature maps, shared by the heads that weight features by objects
(FGFI, DeFeat, FGD, Global Knowledge, HGD).

- Box-to-level rule (the FPN level rule, Lin et al. 2017, Eq. 1):
  ``lvl = floor(4 + log2(sqrt(area) / canonical))`` clamped to the available levels. On a
  two-stage detector ``canonical`` is 224 (Detectron2's ``assign_boxes_to_levels``, mmdet's
  ``map_roi_levels`` with finest_scale 56: under 112 px -> P2 or the finest level). On a
  one-stage detector, whose levels start at P3, the official DeFeat and Global Knowledge
  one-stage codes count levels from the first one: under 112 px -> P3, 112-224 -> P4,
  224-448 -> P5, ..., which is ``canonical`` 112 (:func:`canonical_box_size_for`).
- Box windows on a stride-``s`` map (``convention``), end-exclusive, clipped to the map, and
  never empty:

  - ``"inclusive"`` (default): cells ``[floor(x1/s), floor(x2/s)+1) x [floor(y1/s),
    floor(y2/s)+1)`` (the Global Knowledge code's box pooling windows);
  - ``"exclusive"``: ``[floor(x1/s), floor(x2/s))``, and a box whose window is empty in
    either direction marks only its top-left cell ``(floor(y1/s), floor(x1/s))`` (the
    ``get_gt_mask`` of the official DeFeat and Global Knowledge codes);
  - ``"outward"``: ``[floor(x1/s), ceil(x2/s)+1)`` (the official FGD code's foreground
    mask, which also covers the cell after a box's end).
"""

import math
from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "assign_boxes_to_levels",
    "canonical_box_size_for",
    "ONE_STAGE_CANONICAL_BOX_SIZE",
    "TWO_STAGE_CANONICAL_BOX_SIZE",
    "box_windows",
    "box_mask",
    "box_value_mask",
    "WINDOW_CONVENTIONS",
    "feature_level",
    "level_box_masks",
    "resize_mask",
    "gt_boxes_of",
]

WINDOW_CONVENTIONS = ("inclusive", "exclusive", "outward")

# Box size (px) assigned to level 4 by the box-to-level rule, per detector kind.
TWO_STAGE_CANONICAL_BOX_SIZE = 224
ONE_STAGE_CANONICAL_BOX_SIZE = 112


def canonical_box_size_for(one_stage: bool, configured: float = 0) -> float:
    """``configured`` when > 0, else the rule of the detector kind (module docstring)."""
    if configured and configured > 0:
        return float(configured)
    return float(ONE_STAGE_CANONICAL_BOX_SIZE if one_stage else TWO_STAGE_CANONICAL_BOX_SIZE)


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


def box_windows(
    boxes: torch.Tensor, stride: float, feature_hw: Tuple[int, int], convention: str = "inclusive"
) -> torch.Tensor:
    """
    Integer cell windows ``(N, 4)`` = ``(x0, y0, x1, y1)``, end-exclusive, clipped to the map;
    ``convention`` is one of :data:`WINDOW_CONVENTIONS` (module docstring).
    """
    if convention not in WINDOW_CONVENTIONS:
        raise ValueError(f"Unknown box window convention {convention!r}; choose one of {WINDOW_CONVENTIONS}.")
    h, w = feature_hw
    x0 = torch.floor(boxes[:, 0] / stride).clamp(0, w - 1)
    y0 = torch.floor(boxes[:, 1] / stride).clamp(0, h - 1)
    if convention == "inclusive":
        x1 = torch.floor(boxes[:, 2] / stride) + 1
        y1 = torch.floor(boxes[:, 3] / stride) + 1
    elif convention == "exclusive":
        x1 = torch.floor(boxes[:, 2] / stride)
        y1 = torch.floor(boxes[:, 3] / stride)
    else:  # outward
        x1 = torch.ceil(boxes[:, 2] / stride) + 1
        y1 = torch.ceil(boxes[:, 3] / stride) + 1
    x1 = x1.clamp(max=w)
    y1 = y1.clamp(max=h)
    if convention == "exclusive":
        degenerate = (x1 <= x0) | (y1 <= y0)
        x1 = torch.where(degenerate, x0 + 1, x1)
        y1 = torch.where(degenerate, y0 + 1, y1)
    else:
        x1 = torch.maximum(x1, x0 + 1)
        y1 = torch.maximum(y1, y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


def box_value_mask(
    boxes: torch.Tensor,
    values: torch.Tensor,
    stride: float,
    feature_hw: Tuple[int, int],
    reduce: str = "max",
    convention: str = "inclusive",
) -> torch.Tensor:
    """
    An ``(H, W)`` map holding ``values[i]`` inside box ``i``'s window, 0 elsewhere.

    ``reduce``: how overlapping boxes combine: ``"max"`` (FGD's scale mask), or
    ``"overwrite"`` (later boxes win: the Global Knowledge code's order-dependent mask).
    """
    if reduce not in ("max", "overwrite"):
        raise ValueError(f"reduce must be 'max' or 'overwrite', got {reduce!r}")
    h, w = (int(v) for v in feature_hw)
    device = boxes.device
    values = values.to(device=device, dtype=torch.float32)
    if len(boxes) == 0:
        return torch.zeros((h, w), dtype=torch.float32, device=device)
    # Each box's window as an (N, H, W) indicator, built on the boxes' device (no host sync).
    x0, y0, x1, y1 = box_windows(boxes, stride, (h, w), convention).unbind(1)
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    rows = (ys[None] >= y0[:, None]) & (ys[None] < y1[:, None])  # (N, H)
    cols = (xs[None] >= x0[:, None]) & (xs[None] < x1[:, None])  # (N, W)
    inside = rows[:, :, None] & cols[:, None, :]  # (N, H, W)
    if reduce == "max":  # max(0, the values of the boxes covering a cell)
        return torch.where(inside, values[:, None, None], values.new_zeros(())).amax(dim=0).clamp(min=0)
    # "overwrite": the last box covering a cell wins (0 where none does)
    order = torch.arange(1, len(boxes) + 1, device=device)[:, None, None]
    last = (inside * order).amax(dim=0)  # (H, W), 1-based box index, 0 = no box
    return torch.where(last > 0, values[(last - 1).clamp(min=0)], values.new_zeros(()))


def box_mask(
    boxes: torch.Tensor, stride: float, feature_hw: Tuple[int, int], convention: str = "inclusive"
) -> torch.Tensor:
    """Binary ``(H, W)`` union of the boxes' windows."""
    return box_value_mask(boxes, torch.ones(len(boxes), device=boxes.device), stride, feature_hw, convention=convention)


def feature_level(stride: float) -> int:
    """The pyramid level ``log2(stride)`` of a feature map (p2: stride 4 -> 2)."""
    level = math.log2(stride)
    if abs(level - round(level)) > 1e-6:
        raise ValueError(f"Stride {stride} is not a power of two; it has no FPN level.")
    return int(round(level))


def level_box_masks(
    gt_boxes: Sequence[torch.Tensor],
    levels: Mapping[str, int],
    strides: Mapping[str, float],
    sizes: Mapping[str, Tuple[int, int]],
    assign_by_scale: bool = True,
    canonical_box_size: int = 224,
    canonical_level: int = 4,
    convention: str = "exclusive",
) -> Dict[str, torch.Tensor]:
    """
    Per pyramid level, the binary ``(B, H, W)`` union of each image's GT boxes **assigned to
    that level** (the FPN level rule, Lin et al. 2017, Eq. 1), as DeFeat's and the Global Knowledge code's masks.

    Args:
        gt_boxes: per image, ``(N_i, 4)`` XYXY boxes in input pixels.
        levels: feature name -> pyramid level (p2 -> 2; :func:`feature_level` of the stride).
        strides: feature name -> input pixels per cell of the map the mask is drawn on.
        sizes: feature name -> ``(H, W)`` of that map.
        assign_by_scale: assign each box to one level by the box-to-level rule, clamped to
            the levels present in ``levels`` (the official codes use P2..P6, five levels);
            False puts every box on every level.
        canonical_box_size, canonical_level: the rule's constants (224 <-> level 4).
        convention: box window convention (:data:`WINDOW_CONVENTIONS`); the DeFeat/GK
            masks are ``"exclusive"``.
    """
    min_level, max_level = min(levels.values()), max(levels.values())
    assigned = [
        assign_boxes_to_levels(b, min_level, max_level, canonical_box_size, canonical_level) if len(b) else None
        for b in gt_boxes
    ]
    out = {}
    for name, level in levels.items():
        masks = []
        for boxes, box_levels in zip(gt_boxes, assigned):
            selected = boxes if (box_levels is None or not assign_by_scale) else boxes[box_levels == level]
            if len(selected):
                masks.append(box_mask(selected, strides[name], sizes[name], convention).to(boxes.device))
            else:
                masks.append(torch.zeros(tuple(sizes[name]), dtype=torch.float32, device=boxes.device))
        out[name] = torch.stack(masks)
    return out


def resize_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A ``(B, H, W)`` mask brought to ``size`` by nearest-neighbour sampling (identity if equal)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0]


def gt_boxes_of(instances, device=None) -> torch.Tensor:
    """The ``(N, 4)`` XYXY ``gt_boxes`` of an ``Instances``; ``(0, 4)`` if it has none."""
    if instances is not None and instances.has("gt_boxes"):
        boxes = instances.gt_boxes.tensor
        return boxes.to(device) if device is not None else boxes
    return torch.zeros((0, 4), device=device)
