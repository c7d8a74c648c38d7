"""
Spatial ("micro") weights of a feature map: where imitation should look.

``w = g * a`` with ``g`` a ground-truth box mask (``fg_weight`` inside the boxes' windows,
``bg_weight`` outside; :func:`d2kd.modeling.box_masks.box_mask`) and ``a`` the teacher's
spatial attention ``H*W*softmax_hw(mean_c |T| / tau)``
(:func:`d2kd.modeling.attention.spatial_attention_mask`, mean 1 over the map). Used by the
HGD-like head (docs/methods/hgd.md); a mode switches either factor off.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from ...modeling.attention import spatial_attention_mask
from ...modeling.box_masks import box_mask

__all__ = ["MICRO_MODES", "gt_weight_map", "spatial_weight_map"]

MICRO_MODES = ("none", "gt", "attention", "gt+attention")


def _boxes_of(instances, device=None) -> torch.Tensor:
    if instances is None or not instances.has("gt_boxes"):
        return torch.zeros((0, 4), device=device)
    return instances.gt_boxes.tensor


def gt_weight_map(
    gt_instances: Sequence,
    stride: float,
    feature_hw: Tuple[int, int],
    fg_weight: float = 1.0,
    bg_weight: float = 0.0,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """
    ``(B, H, W)``: ``fg_weight`` inside the union of each image's GT box windows on a
    stride-``stride`` map (box coordinates in input pixels), ``bg_weight`` elsewhere.
    An image without boxes is all ``bg_weight``.
    """
    maps = []
    for inst in gt_instances:
        boxes = _boxes_of(inst, device)
        mask = box_mask(boxes, stride, feature_hw) if len(boxes) else torch.zeros(feature_hw, device=boxes.device)
        maps.append(bg_weight + (fg_weight - bg_weight) * mask.float())
    out = torch.stack(maps) if maps else torch.zeros((0,) + tuple(feature_hw), device=device)
    return out.to(device) if device is not None else out


def spatial_weight_map(
    mode: str,
    teacher_feature: torch.Tensor,
    gt_instances: Sequence,
    stride: float,
    fg_weight: float = 1.0,
    bg_weight: float = 0.0,
    temperature: float = 0.5,
    gt_cache: Optional[Dict] = None,
) -> torch.Tensor:
    """
    The ``(B, H, W)`` weight of a teacher map ``(B, C, H, W)`` for ``mode`` in
    :data:`MICRO_MODES`: ``"none"`` (ones), ``"gt"`` (box mask), ``"attention"`` (teacher
    spatial attention) or ``"gt+attention"`` (their product).

    ``gt_cache``: an optional dict shared by the maps of one step, so maps of the same stride
    and size (e.g. ``res2`` and ``p2``) build the box mask once.
    """
    if mode not in MICRO_MODES:
        raise ValueError(f"Unknown micro re-weighting mode {mode!r}; choose one of {MICRO_MODES}.")
    b, _, h, w = teacher_feature.shape
    device, dtype = teacher_feature.device, teacher_feature.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)  # at least fp32 (softmax under AMP)
    weight = torch.ones((b, h, w), device=device, dtype=compute_dtype)
    if mode in ("gt", "gt+attention"):
        key = (float(stride), h, w)
        if gt_cache is not None and key in gt_cache:
            gt = gt_cache[key]
        else:
            gt = gt_weight_map(gt_instances, stride, (h, w), fg_weight, bg_weight, device=device)
            if gt_cache is not None:
                gt_cache[key] = gt
        if gt.shape[0] != b:
            raise ValueError(f"{gt.shape[0]} images have ground truth but the feature batch has {b}.")
        weight = weight * gt.to(compute_dtype)
    if mode in ("attention", "gt+attention"):
        weight = weight * spatial_attention_mask(teacher_feature.detach().to(compute_dtype), temperature)
    return weight.to(dtype).detach()
