"""
Per-class recall of a detector's RPN proposals: the share of each class's ground-truth boxes
that at least one of the top-k proposals of its image overlaps at IoU >= a threshold.

The RoI head is trained on proposals plus the ground-truth boxes, but at test time it only sees
the proposals, so a class the RPN misses is lost however well the RoI head classifies. This is
what tells an RPN that learned a class slowly from a box head that did (docs/accuracy_study.md,
"A shorter schedule").
"""

from typing import Dict, Sequence

import torch
from detectron2.structures import Boxes, pairwise_iou

__all__ = ["covered_per_class"]


def covered_per_class(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
                      top_k: Sequence[int], iou_threshold: float = 0.5) -> Dict[int, Dict[int, list]]:
    """
    For one image: ``{k: {class: [covered, total]}}`` where a ground-truth box (XYXY, same
    coordinates as ``proposals``) is covered when one of the first ``k`` proposals (ordered by
    objectness, as the RPN returns them) has IoU >= ``iou_threshold`` with it.
    """
    counts: Dict[int, Dict[int, list]] = {k: {} for k in top_k}
    if len(gt_boxes) == 0:
        return counts
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(proposals))  # (gt, proposals)
    for k in top_k:
        best = iou[:, :k].max(dim=1).values if iou.shape[1] else torch.zeros(len(gt_boxes))
        for cls, hit in zip(gt_classes.tolist(), (best >= iou_threshold).tolist()):
            entry = counts[k].setdefault(int(cls), [0, 0])
            entry[0] += int(hit)
            entry[1] += 1
    return counts
