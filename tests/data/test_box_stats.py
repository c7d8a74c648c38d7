"""d2kd.data.box_stats by hand, and tools/dataset_stats.py on the embedded BCCD test split."""

import os
import xml.etree.ElementTree as ET

import pytest

from conftest import REPO


def test_box_size_stats_by_hand():
    """Per class: box count, median side sqrt(w*h) in the original image and at a training short
    side, and COCO's small (< 32²) / medium / large (>= 96²) area counts."""
    from detectron2.structures import BoxMode

    from d2kd.data.box_stats import box_size_stats

    def box(x, y, w, h, cls, mode=BoxMode.XYWH_ABS):
        if mode == BoxMode.XYXY_ABS:
            return {"bbox": [x, y, x + w, y + h], "bbox_mode": mode, "category_id": cls}
        return {"bbox": [x, y, w, h], "bbox_mode": mode, "category_id": cls}

    dicts = [
        # 480 x 640 image; at short side 320 each side is scaled by 2/3
        {"height": 480, "width": 640, "annotations": [box(0, 0, 30, 30, 0), box(5, 5, 40, 40, 0, BoxMode.XYXY_ABS),
                                                       box(0, 0, 100, 100, 1)]},
        # 320 x 320 image: scale 1
        {"height": 320, "width": 320, "annotations": [box(0, 0, 60, 15, 0)]},  # side 30: small
    ]
    stats = box_size_stats(dicts, ["small_cls", "large_cls", "absent"], short_side=320)
    # small_cls sides 30, 40 (first image; scaled 20, 26.7) and 30 (second; scaled 30)
    assert stats["small_cls"] == {"count": 3, "median_side": 30.0, "small": 2, "medium": 1, "large": 0,
                                  "median_side_scaled": pytest.approx(40 * 2 / 3)}
    assert stats["large_cls"] == {"count": 1, "median_side": 100.0, "small": 0, "medium": 0, "large": 1,
                                  "median_side_scaled": pytest.approx(100 * 2 / 3)}
    assert stats["absent"] == {"count": 0, "median_side": None, "small": 0, "medium": 0, "large": 0,
                               "median_side_scaled": None}
    assert "median_side_scaled" not in box_size_stats(dicts, ["small_cls", "large_cls", "absent"])["small_cls"]


def test_dataset_stats_tool_counts_the_embedded_bccd_test_boxes():
    """tools/dataset_stats.py on bccd_test: its box counts per class (the VOC files' objects of
    the test split, counted here from the XML directly) and the small-box count of Platelets."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dataset_stats", os.path.join(REPO, "tools", "dataset_stats.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    lines = tool.main(["--datasets", "bccd_test", "--short-side", "320"])
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in "\n".join(lines).splitlines()
            if line.startswith("| ")}
    root = os.path.join(REPO, "datasets", "bccd")
    with open(os.path.join(root, "ImageSets", "Main", "test.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    counts = {}
    for image_id in ids:
        for obj in ET.parse(os.path.join(root, "Annotations", image_id + ".xml")).getroot().iter("object"):
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            if x1 > x0 and y1 > y0:  # the loader drops zero-area boxes
                counts[obj.find("name").text] = counts.get(obj.find("name").text, 0) + 1
    assert {cls: int(rows[cls][0]) for cls in ("RBC", "WBC", "Platelets")} == counts
    assert int(rows["Platelets"][3]) > 0 and int(rows["RBC"][3]) == 0  # only Platelets fall under 32²
