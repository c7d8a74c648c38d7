"""d2kd.data.mapper: image header checks; truncated images are named while loading."""

import copy

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from d2kd import DistillTrainer, register_voc_dataset
from d2kd.data import DatasetFormatError
from d2kd.data.mapper import SafeDatasetMapper, check_image_file

from conftest import VOC_CLASSES, jpeg_bytes, make_voc, tiny_train_cfg, voc_xml


def test_image_header_check(tmp_path):
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((4, 4, 3), np.uint8))
    assert check_image_file(str(png)) == "PNG"
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(jpeg_bytes())
    assert check_image_file(str(jpg)) == "JPEG"
    with pytest.raises(DatasetFormatError, match="not found"):
        check_image_file(str(tmp_path / "none.jpg"))


def test_truncated_image_is_named_by_the_loader(tmp_path):
    """A JPEG with a valid header but cut short passes the header check; the mapper names it."""
    whole = jpeg_bytes(seed=1)
    truncated = whole[: len(whole) // 2]
    root = make_voc(tmp_path / "voc", {"cut": (truncated, voc_xml())})
    register_voc_dataset("test_truncated_voc", root, "train", VOC_CLASSES)
    assert len(DatasetCatalog.get("test_truncated_voc")) == 1  # header check passes
    loader = DistillTrainer.build_train_loader(tiny_train_cfg(tmp_path, "test_truncated_voc"))
    with pytest.raises(DatasetFormatError, match=r"JPEGImages/cut.jpg"):
        next(iter(loader))
    # The same for evaluation.
    cfg = tiny_train_cfg(tmp_path, "test_truncated_voc")
    with pytest.raises(DatasetFormatError, match=r"cut.jpg"):
        next(iter(DistillTrainer.build_test_loader(cfg, "test_truncated_voc")))


def test_image_cut_inside_its_header_is_named_when_the_dataset_loads(tmp_path):
    root = make_voc(tmp_path / "voc", {"cut": (jpeg_bytes(seed=1)[:200], voc_xml())})
    register_voc_dataset("test_cut_header_voc", root, "train", VOC_CLASSES)
    with pytest.raises(DatasetFormatError, match=r"JPEGImages/cut.jpg cannot be read"):
        DatasetCatalog.get("test_cut_header_voc")


def test_safe_mapper_passes_good_images_through(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), voc_xml())})
    register_voc_dataset("test_good_voc", root, "train", VOC_CLASSES)
    cfg = tiny_train_cfg(tmp_path, "test_good_voc")
    out = SafeDatasetMapper(cfg, True)(copy.deepcopy(DatasetCatalog.get("test_good_voc")[0]))
    assert out["image"].shape[0] == 3 and len(out["instances"]) == 1
