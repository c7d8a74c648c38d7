"""
Box sizes per class of a registered detection dataset: how many boxes, their median side
(sqrt of the box area) in the original images and at a training scale, and how many fall in
COCO's small / medium / large area ranges (< 32², < 96², else; the ranges `APs`, `APm` and
`APl` are computed on).

Which classes are small decides which pyramid levels carry them (Detectron2's ROIPooler maps a
box of side s to level floor(4 + log2(s / 224)), clamped to the levels present), so this is the
first thing to read when a distillation method helps one class and hurts another.
"""

import math
from statistics import median
from typing import Dict, List, Optional, Sequence

from detectron2.structures import BoxMode

__all__ = ["box_size_stats", "COCO_SMALL", "COCO_MEDIUM"]

# COCO's area ranges (pycocotools' COCOeval.params.areaRng), as box sides.
COCO_SMALL = 32
COCO_MEDIUM = 96


def box_size_stats(dataset_dicts: List[dict], class_names: Sequence[str],
                   short_side: Optional[int] = None) -> Dict[str, dict]:
    """
    Per class name: ``count``, ``median_side`` (original pixels), ``small``, ``medium``,
    ``large`` (COCO area ranges on the original boxes) and, with ``short_side``,
    ``median_side_scaled``: the median of side * short_side / min(height, width), the size the
    detector sees when the image's short side is resized to ``short_side``.
    """
    sides: Dict[int, List[float]] = {i: [] for i in range(len(class_names))}
    scaled: Dict[int, List[float]] = {i: [] for i in range(len(class_names))}
    for record in dataset_dicts:
        scale = None
        if short_side:
            scale = short_side / min(record["height"], record["width"])
        for ann in record.get("annotations", []):
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            side = math.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0))
            sides[ann["category_id"]].append(side)
            if scale is not None:
                scaled[ann["category_id"]].append(side * scale)
    stats = {}
    for i, name in enumerate(class_names):
        values = sides[i]
        entry = {
            "count": len(values),
            "median_side": median(values) if values else None,
            "small": sum(s < COCO_SMALL for s in values),
            "medium": sum(COCO_SMALL <= s < COCO_MEDIUM for s in values),
            "large": sum(s >= COCO_MEDIUM for s in values),
        }
        if short_side:
            entry["median_side_scaled"] = median(scaled[i]) if scaled[i] else None
        stats[name] = entry
    return stats
