"""Datasets: BCCD, a user's VOC/COCO data, broken files named, empty datasets, samplers."""

import copy
import json
import os
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.samplers import TrainingSampler

from d2kd import DistillTrainer, register_coco_dataset, register_voc_dataset
from d2kd.data import BCCD_CLASSES, DatasetFormatError, datasets_root, load_voc_detection, register_bccd
from d2kd.data.mapper import SafeDatasetMapper, check_image_file
from d2kd.data.sampler import ResumedTrainingSampler
from d2kd.data.subset import register_subset_dataset

from conftest import REPO, load_test_cfg

CLASSES = ("cat", "dog")


def jpeg_bytes(width=64, height=48, seed=0) -> bytes:
    rng = np.random.RandomState(seed)
    image = rng.randint(0, 255, size=(height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def voc_xml(width=64, height=48, objects=(("cat", (11, 6, 40, 30), 0),), size=True) -> str:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, difficult in objects
    )
    size_xml = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>x.jpg</filename>{size_xml}{objs}</annotation>"


def make_voc(root, images, split="train"):
    """A VOC folder: ``images`` maps id -> (jpeg bytes or None for no file, xml text or None)."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, (jpg, xml) in images.items():
        if jpg is not None:
            with open(os.path.join(root, "JPEGImages", image_id + ".jpg"), "wb") as f:
                f.write(jpg)
        if xml is not None:
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(xml)
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("".join(i + "\n" for i in images))
    return str(root)


# ---------------------------------------------------------------------------------------
# BCCD and the VOC loader
# ---------------------------------------------------------------------------------------


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


def test_voc_loader_converts_coordinates_and_flags(tmp_path):
    xml = voc_xml(objects=(("cat", (11, 6, 40, 30), 0), ("dog", (1, 1, 64, 48), 1), ("cat", (6, 5, 4, 9), 0)))
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), xml)})
    (d,) = load_voc_detection(root, "train", CLASSES)
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
    register_voc_dataset("test_broken_voc", root, split, CLASSES)
    with pytest.raises(DatasetFormatError, match=message):
        DatasetCatalog.get("test_broken_voc")


def test_missing_voc_root_fails_at_registration(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        register_voc_dataset("test_nowhere", str(tmp_path / "nowhere"), "train", CLASSES)


def test_image_header_check(tmp_path):
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((4, 4, 3), np.uint8))
    assert check_image_file(str(png)) == "PNG"
    jpg = tmp_path / "x.jpg"
    jpg.write_bytes(jpeg_bytes())
    assert check_image_file(str(jpg)) == "JPEG"
    with pytest.raises(DatasetFormatError, match="not found"):
        check_image_file(str(tmp_path / "none.jpg"))


def tiny_train_cfg(tmp_path, dataset, opts=()):
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path / "out", opts=list(opts))
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    return cfg


def test_truncated_image_is_named_by_the_loader(tmp_path):
    """A JPEG with a valid header but cut short passes the header check; the mapper names it."""
    truncated = jpeg_bytes(seed=1)[:200]
    root = make_voc(tmp_path / "voc", {"cut": (truncated, voc_xml())})
    register_voc_dataset("test_truncated_voc", root, "train", CLASSES)
    assert len(DatasetCatalog.get("test_truncated_voc")) == 1  # header check passes
    loader = DistillTrainer.build_train_loader(tiny_train_cfg(tmp_path, "test_truncated_voc"))
    with pytest.raises(DatasetFormatError, match=r"JPEGImages/cut.jpg"):
        next(iter(loader))
    # The same for evaluation.
    cfg = tiny_train_cfg(tmp_path, "test_truncated_voc")
    with pytest.raises(DatasetFormatError, match=r"cut.jpg"):
        next(iter(DistillTrainer.build_test_loader(cfg, "test_truncated_voc")))


def test_safe_mapper_passes_good_images_through(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), voc_xml())})
    register_voc_dataset("test_good_voc", root, "train", CLASSES)
    cfg = tiny_train_cfg(tmp_path, "test_good_voc")
    out = SafeDatasetMapper(cfg, True)(copy.deepcopy(DatasetCatalog.get("test_good_voc")[0]))
    assert out["image"].shape[0] == 3 and len(out["instances"]) == 1


def test_dataset_without_usable_boxes(tmp_path):
    """Only invalid boxes or none: a clear error with the fix, and the fix works."""
    no_boxes = voc_xml(objects=())
    zero_area = voc_xml(objects=(("cat", (6, 5, 4, 9), 0),))
    root = make_voc(tmp_path / "voc", {"a": (jpeg_bytes(), no_boxes), "b": (jpeg_bytes(seed=2), zero_area)})
    register_voc_dataset("test_boxless_voc", root, "train", CLASSES)
    with pytest.raises(DatasetFormatError, match="FILTER_EMPTY_ANNOTATIONS False"):
        DistillTrainer.build_train_loader(tiny_train_cfg(tmp_path, "test_boxless_voc"))
    cfg = tiny_train_cfg(tmp_path, "test_boxless_voc", opts=["DATALOADER.FILTER_EMPTY_ANNOTATIONS", False])
    batch = next(iter(DistillTrainer.build_train_loader(cfg)))
    assert len(batch) == 1 and len(batch[0]["instances"]) == 0


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


def test_resumed_sampler_skips_consumed_indices():
    base = iter(TrainingSampler(10, seed=3))
    stream = [next(base) for _ in range(30)]
    resumed = iter(ResumedTrainingSampler(10, seed=3, skip_per_rank=7))
    assert [next(resumed) for _ in range(23)] == stream[7:]


def test_datasets_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("D2KD_DATASETS", str(tmp_path))
    assert datasets_root() == str(tmp_path)
    monkeypatch.delenv("D2KD_DATASETS")
    assert os.path.isdir(os.path.join(datasets_root(), "bccd"))


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
