"""Pascal VOC loading: the image named by <filename> (any format), inverted and clipped boxes, <size> checked at load."""

import logging
import os

import pytest
from PIL import Image

from d2kd.data import DatasetFormatError, load_voc_detection

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD_IMAGE = os.path.join(REPO, "datasets", "bccd", "JPEGImages", "BloodImage_00000.jpg")  # 640x480


def _object(name, box):
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def make_voc(root, image_id, boxes, filename=None, size=(640, 480), image_format="PNG", image_name=None):
    """A one-image VOC dataset: the BCCD image saved as ``image_name`` (default ``<id>.<format>``)."""
    for folder in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    image_name = image_name or f"{image_id}.{image_format.lower()}"
    Image.open(BCCD_IMAGE).save(os.path.join(root, "JPEGImages", image_name), format=image_format)
    filename_tag = f"<filename>{filename}</filename>" if filename else ""
    objects = "".join(_object(name, box) for name, box in boxes)
    with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
        f.write(
            f"<annotation>{filename_tag}<size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objects}</annotation>"
        )
    with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
        f.write(image_id + "\n")
    return str(root)


@pytest.fixture
def voc_warnings(d2kd_logs):
    """Warnings of the VOC loader."""
    return d2kd_logs("d2kd.data.voc", logging.WARNING)


def test_png_image_named_by_filename(tmp_path):
    root = make_voc(tmp_path, "cell", [("RBC", (10, 20, 110, 220))], filename="cell.png")
    (record,) = load_voc_detection(root, "train", ["RBC"])
    assert record["file_name"] == os.path.join(root, "JPEGImages", "cell.png")
    assert record["annotations"][0]["bbox"] == [9.0, 19.0, 110.0, 220.0]


def test_filename_that_differs_from_the_id_is_honoured(tmp_path):
    root = make_voc(tmp_path, "0001", [("RBC", (10, 20, 110, 220))], filename="scan_a.jpeg", image_format="JPEG",
                    image_name="scan_a.jpeg")
    (record,) = load_voc_detection(root, "train", ["RBC"])
    assert record["file_name"].endswith("scan_a.jpeg")


def test_png_without_filename_tag_is_found_by_extension(tmp_path):
    root = make_voc(tmp_path, "cell", [("RBC", (10, 20, 110, 220))])
    (record,) = load_voc_detection(root, "train", ["RBC"])
    assert record["file_name"].endswith("cell.png")


def test_missing_image_lists_what_was_tried(tmp_path):
    root = make_voc(tmp_path, "cell", [("RBC", (10, 20, 110, 220))], filename="other.tif", image_name="unrelated.png")
    with pytest.raises(DatasetFormatError, match=r"other\.tif.*tried") as error:
        load_voc_detection(root, "train", ["RBC"])
    assert ".png" in str(error.value) and "cell" in str(error.value)


def test_inverted_box_is_reported_as_inverted(tmp_path, voc_warnings):
    root = make_voc(tmp_path, "cell", [("RBC", (200, 20, 100, 220)), ("RBC", (10, 20, 110, 220))])
    (record,) = load_voc_detection(root, "train", ["RBC"])
    assert len(record["annotations"]) == 1
    messages = " ".join(r.getMessage() for r in voc_warnings.records)
    assert "inverted" in messages and "zero-area" not in messages


def test_zero_area_box_is_still_reported_as_zero_area(tmp_path, voc_warnings):
    root = make_voc(tmp_path, "cell", [("RBC", (50, 20, 50, 220))])
    (record,) = load_voc_detection(root, "train", ["RBC"])
    assert record["annotations"] == []
    assert "zero-area" in " ".join(r.getMessage() for r in voc_warnings.records)


def test_boxes_beyond_the_image_are_clipped_with_one_counted_warning(tmp_path, voc_warnings):
    root = make_voc(tmp_path, "cell", [("RBC", (600, 400, 700, 520)), ("RBC", (-5, 10, 50, 60)), ("RBC", (10, 10, 50, 60))])
    (record,) = load_voc_detection(root, "train", ["RBC"])
    boxes = [a["bbox"] for a in record["annotations"]]
    assert boxes == [[599.0, 399.0, 640.0, 480.0], [0.0, 9.0, 50.0, 60.0], [9.0, 9.0, 50.0, 60.0]]
    clip_warnings = [r.getMessage() for r in voc_warnings.records if "clipped" in r.getMessage()]
    assert len(clip_warnings) == 1 and "2 box(es)" in clip_warnings[0] and "cell.xml" in clip_warnings[0]


def test_size_that_disagrees_with_the_image_fails_at_load(tmp_path):
    root = make_voc(tmp_path, "cell", [("RBC", (10, 20, 110, 220))], size=(480, 640))
    with pytest.raises(DatasetFormatError, match=r"480x640.*640x480.*correct <size>"):
        load_voc_detection(root, "train", ["RBC"])
