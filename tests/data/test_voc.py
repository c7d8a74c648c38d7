"""d2kd.data.voc: VOC coordinates and flags; broken datasets name the file; a missing root fails early."""

import os

import pytest
from detectron2.data import DatasetCatalog

from d2kd import register_voc_dataset
from d2kd.data import DatasetFormatError, load_voc_detection

from conftest import VOC_CLASSES, jpeg_bytes, make_voc, voc_xml


def test_voc_loader_converts_coordinates_and_flags(tmp_path):
    xml = voc_xml(objects=(("cat", (11, 6, 40, 30), 0), ("dog", (1, 1, 64, 48), 1), ("cat", (6, 5, 4, 9), 0)))
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), xml)})
    (d,) = load_voc_detection(root, "train", VOC_CLASSES)
    assert (d["width"], d["height"]) == (64, 48) and d["image_id"] == "a"
    assert d["file_name"] == os.path.join(root, "JPEGImages", "a.jpg")
    # 1-based inclusive VOC pixels -> 0-based continuous: xmin, ymin shift by one.
    assert [a["bbox"] for a in d["annotations"]] == [[10.0, 5.0, 40.0, 30.0], [0.0, 0.0, 64.0, 48.0]]
    assert [a["category_id"] for a in d["annotations"]] == [0, 1]
    assert [a["difficult"] for a in d["annotations"]] == [0, 1]
    assert all(a["iscrowd"] == 0 for a in d["annotations"])  # the inverted box (x 6..4) is dropped


def _broken_cases():
    good_jpg, good_xml = jpeg_bytes(), voc_xml()
    return {
        # case: (images, split to load, text the error must contain)
        "missing split": ({"a": (good_jpg, good_xml)}, "val", "split file not found"),
        "empty split": ({}, "train", "lists no images"),
        "missing annotation": ({"a": (good_jpg, None)}, "train", "Annotations/a.xml"),
        "missing image": ({"a": (None, good_xml)}, "train", "JPEGImages/a.jpg"),
        "corrupt xml": ({"a": (good_jpg, "<annotation><size>")}, "train", "Corrupt annotation file .*a.xml"),
        "no size": ({"a": (good_jpg, voc_xml(size=False))}, "train", "a.xml.*<size>"),
        "unknown class": ({"a": (good_jpg, voc_xml(objects=(("cow", (1, 1, 5, 5), 0),)))}, "train", "a.xml.*'cow'"),
        "no bndbox": ({"a": (good_jpg, "<annotation><size><width>4</width><height>4</height></size>"
                                       "<object><name>cat</name></object></annotation>")}, "train", "a.xml.*no <bndbox>"),
        "text coordinates": ({"a": (good_jpg, voc_xml(objects=(("cat", ("left", 1, 5, 5), 0),)))}, "train", "a.xml.*numeric"),
        "0-byte image": ({"a": (b"", good_xml)}, "train", "a.jpg is empty"),
        "garbage image": ({"a": (b"this is not an image at all", good_xml)}, "train", "a.jpg is not a readable image"),
    }


@pytest.mark.parametrize("case", sorted(_broken_cases()))
def test_broken_voc_dataset_names_the_file(tmp_path, case):
    images, split, message = _broken_cases()[case]
    root = make_voc(tmp_path / "voc", images)
    register_voc_dataset("test_broken_voc", root, split, VOC_CLASSES)
    with pytest.raises(DatasetFormatError, match=message):
        DatasetCatalog.get("test_broken_voc")


def test_missing_voc_root_fails_at_registration(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        register_voc_dataset("test_nowhere", str(tmp_path / "nowhere"), "train", VOC_CLASSES)
