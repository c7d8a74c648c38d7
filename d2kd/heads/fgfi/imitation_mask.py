"""
FGFI's anchor-IoU imitation mask (Wang et al., CVPR 2019, "Distilling Object Detectors with
Fine-grained Feature Imitation", Sec. 3.1; docs/methods/fgfi.md) and access to the anchors a
Detectron2 detector generates on each feature map.

For one image, one feature map and its ``H x W x A`` anchors: for every GT box ``g``,
``F_g = psi * max_{h,w,a} IoU_g(h, w, a)``; location ``(h, w)`` is in ``g``'s region when
``IoU_g(h, w, a) > F_g`` for some anchor ``a``; the mask is the union over GT boxes. All
anchors count, including those crossing the image border (as the official code).
"""

from typing import List, Optional, Tuple

import torch
from detectron2.structures import Boxes, pairwise_iou
from torch import nn

__all__ = ["anchor_source", "imitation_mask"]


def anchor_source(model: nn.Module) -> Optional[Tuple[str, List[str]]]:
    """
    ``(module path of the anchor generator, feature names it is called on, in order)`` for a
    GeneralizedRCNN (the RPN's generator) or a RetinaNet-style dense detector; ``None`` if
    the model generates no anchors. The generator's output (a list of ``Boxes`` per level,
    ``H*W*A`` anchors each, ordered ``(h, w, a)``) is what a head records.
    """
    rpn = getattr(model, "proposal_generator", None)
    if rpn is not None and hasattr(rpn, "anchor_generator") and hasattr(rpn, "in_features"):
        return "proposal_generator.anchor_generator", list(rpn.in_features)
    if hasattr(model, "anchor_generator") and hasattr(model, "head_in_features"):
        return "anchor_generator", list(model.head_in_features)
    return None


def imitation_mask(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, feature_hw: Tuple[int, int], psi: float = 0.5
) -> torch.Tensor:
    """
    FGFI imitation mask ``I`` of one image on one feature map, ``(H, W)`` float in {0, 1}.

    Args:
        anchors: ``(H*W*A, 4)`` XYXY anchors of the map, ordered ``(h, w, a)`` (Detectron2's
            anchor generators).
        gt_boxes: ``(G, 4)`` XYXY ground-truth boxes in the same (input pixel) coordinates.
        feature_hw: ``(H, W)`` of the map.
        psi: the threshold factor (0.5 in the paper and code).
    """
    h, w = int(feature_hw[0]), int(feature_hw[1])
    if anchors.shape[0] % (h * w) != 0:
        raise ValueError(f"{anchors.shape[0]} anchors do not tile a {h}x{w} map.")
    if len(gt_boxes) == 0:
        return torch.zeros((h, w), dtype=torch.float32, device=anchors.device)
    iou = pairwise_iou(Boxes(anchors), Boxes(gt_boxes.to(anchors.device)))  # (H*W*A, G)
    threshold = psi * iou.max(dim=0).values  # (G,)
    above = iou > threshold[None, :]
    num_anchors = anchors.shape[0] // (h * w)
    return above.view(h, w, num_anchors, -1).any(dim=3).any(dim=2).to(torch.float32)
