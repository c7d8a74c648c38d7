"""Datasets declared in the config (DATASETS.DEFINE / DATASETS.CLASSES) and a BCCD folder that is missing."""

import json
import os
import shutil

import pytest
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd.config import load_config
from d2kd.data import DatasetFormatError, register_bccd, register_config_datasets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD = os.path.join(REPO, "datasets", "bccd")
IDS = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00002"]


def copy_bccd(root, ids=IDS, split="mine"):
    """A few BCCD images as a VOC dataset of one's own, with a split of another name."""
    for folder in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for image_id in ids:
        shutil.copy(os.path.join(BCCD, "Annotations", image_id + ".xml"), os.path.join(root, "Annotations"))
        shutil.copy(os.path.join(BCCD, "JPEGImages", image_id + ".jpg"), os.path.join(root, "JPEGImages"))
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return str(root)


def write_cfg(path, datasets):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"DATASETS": datasets}))
    return str(path)


@pytest.fixture
def unregister():
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_voc_rows_register_with_paths_relative_to_the_yaml(tmp_path, monkeypatch, unregister):
    copy_bccd(tmp_path / "project" / "cells")
    cfg_file = write_cfg(
        tmp_path / "project" / "cells.yaml",
        {"DEFINE": [["cells_mine", "voc", "cells", "mine"]], "CLASSES": ["RBC", "WBC", "Platelets"],
         "TRAIN": ["cells_mine"]},
    )
    monkeypatch.chdir(tmp_path)
    unregister.append("cells_mine")
    cfg = load_config(cfg_file)
    assert cfg.DATASETS.DEFINE[0][2] == str(tmp_path / "project" / "cells")
    assert register_config_datasets(cfg) == ["cells_mine"]
    assert [d["image_id"] for d in DatasetCatalog.get("cells_mine")] == IDS
    assert MetadataCatalog.get("cells_mine").thing_classes == ["RBC", "WBC", "Platelets"]
    assert register_config_datasets(cfg) == ["cells_mine"]  # idempotent


def test_coco_row_registers(tmp_path, unregister):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(os.path.join(BCCD, "JPEGImages", IDS[0] + ".jpg"), images / "a.jpg")
    annotations = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0}],
        "categories": [{"id": 7, "name": "cell"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    cfg = load_config(write_cfg(tmp_path / "c.yaml", {"DEFINE": [["shop_train", "coco", "train.json", "images"]]}))
    unregister.append("shop_train")
    register_config_datasets(cfg)
    (record,) = DatasetCatalog.get("shop_train")
    assert record["file_name"] == str(images / "a.jpg")
    assert MetadataCatalog.get("shop_train").thing_classes == ["cell"]


@pytest.mark.parametrize(
    "row,classes,message",
    [
        (["x", "yolo", ".", "train"], ["RBC"], r"DATASETS\.DEFINE\[0\].*unknown format 'yolo'"),
        (["x", "voc", "no/such/folder", "train"], ["RBC"], r"DATASETS\.DEFINE\[0\].*does not exist"),
        (["x", "voc", "cells"], ["RBC"], r"four non-empty strings"),
        (["x", "voc", "cells", "mine"], [], r"needs DATASETS\.CLASSES"),
        (["x", "voc", "cells", "mine"], ["RBC"], r"classes \[.*'WBC'.*\] that DATASETS\.CLASSES"),
        (["x", "voc", "cells", "nosplit"], ["RBC"], r"split file not found"),
        (["x", "coco", "missing.json", "cells"], [], r"COCO annotation file .* does not exist"),
    ],
)
def test_bad_rows_name_the_row_and_the_fix(tmp_path, monkeypatch, row, classes, message):
    copy_bccd(tmp_path / "cells")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_cfg(tmp_path / "c.yaml", {"DEFINE": [row], "CLASSES": classes}))
    with pytest.raises(DatasetFormatError, match=message):
        register_config_datasets(cfg)


def test_missing_bccd_folder_fails_only_when_bccd_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("D2KD_DATASETS", str(tmp_path / "nowhere"))
    DatasetCatalog.remove("bccd_val")
    MetadataCatalog.remove("bccd_val")
    try:
        register_bccd()  # does not raise: a run on other data is not blocked
        with pytest.raises(DatasetFormatError, match=r"D2KD_DATASETS.*nowhere"):
            DatasetCatalog.get("bccd_val")
    finally:
        DatasetCatalog.remove("bccd_val")
        MetadataCatalog.remove("bccd_val")
        register_bccd(os.path.join(REPO, "datasets"))
    assert len(DatasetCatalog.get("bccd_val")) > 0
