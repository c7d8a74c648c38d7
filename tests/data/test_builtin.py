"""d2kd.data.builtin: the embedded BCCD splits, a user's COCO data, the datasets root."""

import copy
import json
import os
import xml.etree.ElementTree as ET

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd import register_coco_dataset
from d2kd.data import BCCD_CLASSES, DatasetFormatError, datasets_root, register_bccd
from d2kd.data.mapper import SafeDatasetMapper

from conftest import REPO, jpeg_bytes, tiny_train_cfg


def test_bccd_splits_load_with_positive_area_boxes():
    register_bccd()  # idempotent: already registered by conftest
    root = os.path.join(REPO, "datasets", "bccd")
    dicts = DatasetCatalog.get("bccd_trainval")
    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt")) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    assert len(dicts) == len(ids) == 292
    assert MetadataCatalog.get("bccd_trainval").thing_classes == list(BCCD_CLASSES)
    # Count the boxes straight from the XML files. BCCD's two zero-area boxes (xmin == xmax,
    # ymin == ymax as annotated; SOURCE.md lists them as defects) are dropped.
    expected, degenerate = 0, 0
    for i in ids:
        for obj in ET.parse(os.path.join(root, "Annotations", i + ".xml")).findall("object"):
            b = [float(obj.find("bndbox").find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]
            if b[2] > b[0] and b[3] > b[1]:
                expected += 1
            else:
                degenerate += 1
    assert degenerate == 2
    assert sum(len(d["annotations"]) for d in dicts) == expected
    for d in dicts:
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert x1 > x0 and y1 > y0 and 0 <= a["category_id"] < 3


def test_coco_dataset_registration_and_broken_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(jpeg_bytes())
    (images / "bad.jpg").write_bytes(jpeg_bytes(seed=3)[:150])
    coco = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "bad.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(coco))
    with pytest.raises(DatasetFormatError, match="annotation file not found"):
        register_coco_dataset("test_coco", str(tmp_path / "none.json"), str(images))
    with pytest.raises(DatasetFormatError, match="image folder not found"):
        register_coco_dataset("test_coco", str(json_file), str(tmp_path / "none"))
    register_coco_dataset("test_coco", str(json_file), str(images), ["cat"])
    dicts = DatasetCatalog.get("test_coco")
    assert [os.path.basename(d["file_name"]) for d in dicts] == ["good.jpg", "bad.jpg"]
    assert dicts[0]["annotations"][0]["bbox"] == [10, 5, 20, 10]
    cfg = tiny_train_cfg(tmp_path, "test_coco")
    mapper = SafeDatasetMapper(cfg, True)
    assert len(mapper(copy.deepcopy(dicts[0]))["instances"]) == 1
    with pytest.raises(DatasetFormatError, match="bad.jpg"):
        mapper(copy.deepcopy(dicts[1]))


def test_a_coco_annotation_with_an_unknown_category_names_file_annotation_and_category(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg_bytes())
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [1, 5, 20, 10], "area": 200, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    json_file = tmp_path / "bad_category.json"
    json_file.write_text(json.dumps(coco))
    register_coco_dataset("test_coco_bad_category", str(json_file), str(images))
    try:
        with pytest.raises(
            DatasetFormatError, match=r"bad_category\.json: annotation id 12 \(image id 1\) has category_id 7.*ids \[1, 2\]"
        ):
            DatasetCatalog.get("test_coco_bad_category")
    finally:
        DatasetCatalog.remove("test_coco_bad_category")
        MetadataCatalog.remove("test_coco_bad_category")


def test_datasets_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("D2KD_DATASETS", str(tmp_path))
    assert datasets_root() == str(tmp_path)
    monkeypatch.delenv("D2KD_DATASETS")
    assert os.path.isdir(os.path.join(datasets_root(), "bccd"))


def test_the_decode_check_lists_every_truncated_image(tmp_path):
    from d2kd.data.mapper import check_image_file, check_images_decode, find_unreadable_images

    good, cut_a, cut_b = (tmp_path / n for n in ("good.jpg", "cut_a.jpg", "cut_b.jpg"))
    good.write_bytes(jpeg_bytes())
    cut_a.write_bytes(jpeg_bytes(seed=1)[:300])
    cut_b.write_bytes(jpeg_bytes(seed=2)[:400])
    assert check_image_file(str(cut_a)) == "JPEG"  # the header check lets them through
    dicts = [{"file_name": str(p)} for p in (good, cut_a, good, cut_b)]
    bad = find_unreadable_images(dicts, progress=False)
    assert [f for f, _ in bad] == [str(cut_a), str(cut_b)]
    assert all("truncated" in e or "broken" in e or "Error" in e for _, e in bad), bad
    with pytest.raises(DatasetFormatError, match=r"(?s)2 of 4 training images cannot be decoded.*cut_a\.jpg.*cut_b\.jpg"):
        check_images_decode(dicts, progress=False)
    check_images_decode([{"file_name": str(good)}], progress=False)  # a readable dataset passes
