"""
Datasets declared in the config, so a run on your own data needs no Python:

.. code-block:: yaml

    DATASETS:
      DEFINE:
        - ["cells_train", "voc", "/data/cells", "trainval"]       # [name, "voc", root, split]
        - ["cells_test", "voc", "/data/cells", "test"]
        - ["shop_train", "coco", "/data/shop/train.json", "/data/shop/images"]  # [name, "coco", json, images]
      CLASSES: ["a", "b"]          # the VOC datasets' classes, in category-id order
      TRAIN: ("cells_train",)
      TEST: ("cells_test",)

``train_net.py`` registers them in every process before anything is built (``launch`` starts the
workers of a multi-process run with ``main``, so a dataset declared here exists in each of them;
one registered by Python code in the launching script does not). Relative paths resolve against
the YAML file that names them, then the working directory, like every path a config names.
"""

import os
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .builtin import register_coco_dataset
from .voc import DatasetFormatError, read_voc_split, register_voc_dataset

__all__ = ["DATASET_FORMATS", "register_config_datasets"]

# format -> what the row's third and fourth entries are
DATASET_FORMATS = {"voc": ("dataset root", "split"), "coco": ("annotation json", "image folder")}


def _row_error(index: int, row, problem: str) -> DatasetFormatError:
    return DatasetFormatError(
        f"DATASETS.DEFINE[{index}] = {list(row)}: {problem}. A row is [name, \"voc\", root, split] or "
        "[name, \"coco\", json_file, image_root]."
    )


def _check_row(index: int, row: Sequence) -> None:
    if not isinstance(row, (list, tuple)) or len(row) != 4 or not all(isinstance(x, str) and x for x in row):
        raise _row_error(index, row if isinstance(row, (list, tuple)) else [row], "it needs four non-empty strings")
    name, kind, first, second = row
    if kind not in DATASET_FORMATS:
        raise _row_error(index, row, f"unknown format {kind!r}; known formats: {sorted(DATASET_FORMATS)}")
    if kind == "voc":
        if not os.path.isdir(first):
            raise _row_error(index, row, f"the VOC dataset root {first} does not exist")
        read_voc_split(first, second)  # names the missing split file
    else:
        if not os.path.isfile(first):
            raise _row_error(index, row, f"the COCO annotation file {first} does not exist")
        if not os.path.isdir(second):
            raise _row_error(index, row, f"the COCO image folder {second} does not exist")


def _voc_classes_on_disk(root: str, split: str, limit: int = 200) -> set:
    """Object class names used in the first ``limit`` annotations of a VOC split."""
    import xml.etree.ElementTree as ET

    names = set()
    for image_id in read_voc_split(root, split)[:limit]:
        path = os.path.join(root, "Annotations", image_id + ".xml")
        if os.path.isfile(path):
            try:
                names.update(n.text.strip() for n in ET.parse(path).findall("object/name") if n.text)
            except ET.ParseError:
                continue  # the loader names a corrupt file when the dataset is loaded
    return names


def register_config_datasets(cfg) -> list:
    """
    Register the datasets of ``cfg.DATASETS.DEFINE`` (idempotent: a name registered with the same
    definition is left alone, a different one is replaced). Returns the names. Bad rows, missing
    paths, unknown formats and VOC class lists that disagree with the files fail here, naming the row.
    """
    rows = list(cfg.DATASETS.get("DEFINE", ()))
    classes = list(cfg.DATASETS.get("CLASSES", ()))
    names = []
    for index, row in enumerate(rows):
        _check_row(index, row)
        name, kind, first, second = row
        if name in names:
            raise _row_error(index, row, f"the name {name!r} is defined twice")
        names.append(name)
        definition = (kind, os.path.abspath(first), second if kind == "voc" else os.path.abspath(second))
        if name in DatasetCatalog.list() and MetadataCatalog.get(name).get("d2kd_definition", None) == definition:
            continue
        if kind == "voc":
            if not classes:
                raise _row_error(index, row, "a VOC dataset needs DATASETS.CLASSES, its class names in category-id order")
            unknown = _voc_classes_on_disk(first, second) - set(classes)
            if unknown:
                raise _row_error(
                    index, row, f"its annotations use classes {sorted(unknown)} that DATASETS.CLASSES {classes} lacks; "
                    "list every class in DATASETS.CLASSES"
                )
            register_voc_dataset(name, first, second, classes)
        else:
            register_coco_dataset(name, first, second)
        MetadataCatalog.get(name).set(d2kd_definition=definition)
    return names
