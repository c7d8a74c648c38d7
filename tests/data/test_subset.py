"""d2kd.data.subset: a subset dataset takes the first images and the source's metadata."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from d2kd.data import BCCD_CLASSES
from d2kd.data.subset import register_subset_dataset


def test_subset_dataset_takes_first_images_and_metadata():
    register_subset_dataset("test_bccd_test_3", "bccd_test", 3)
    full = DatasetCatalog.get("bccd_test")
    sub = DatasetCatalog.get("test_bccd_test_3")
    assert [d["image_id"] for d in sub] == [d["image_id"] for d in full[:3]]
    meta = MetadataCatalog.get("test_bccd_test_3")
    assert meta.thing_classes == list(BCCD_CLASSES) and meta.evaluator_type == "coco"
    assert not hasattr(meta, "json_file")
    with pytest.raises(KeyError, match="not registered"):
        register_subset_dataset("test_x", "no_such_dataset", 3)
