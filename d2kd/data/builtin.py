"""
Datasets that ship with d2kd, and registration of a user's COCO-json dataset.

BCCD (blood cells, MIT licence) lives in ``datasets/bccd`` of the repository. The installed
package does not know where the repository is: the root is ``$D2KD_DATASETS`` if set, else
``./datasets``, else the ``default`` a caller gives (``train_net.py`` gives the folder beside
itself).
"""

import json
import os
from typing import Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .voc import DatasetFormatError, register_voc_dataset

__all__ = ["BCCD_CLASSES", "register_bccd", "register_coco_dataset", "datasets_root"]

BCCD_CLASSES = ("RBC", "WBC", "Platelets")
BCCD_SPLITS = {"bccd_train": "train", "bccd_val": "val", "bccd_trainval": "trainval", "bccd_test": "test"}


def datasets_root(default: Optional[str] = None) -> str:
    """The folder holding ``bccd/``: ``$D2KD_DATASETS``, else ``./datasets``, else ``default``."""
    env = os.environ.get("D2KD_DATASETS")
    if env:
        return env
    if os.path.isdir(os.path.join("datasets", "bccd")) or not default:
        return "datasets"
    return default


def register_bccd(root: Optional[str] = None):
    """
    Register ``bccd_{train,val,trainval,test}`` (idempotent). When the BCCD folder is not there
    (``$D2KD_DATASETS`` pointing elsewhere, a run on your own data from another folder), the
    names are still registered, and only a run that uses one fails, naming the folder and the
    variable.
    """
    dirname = os.path.join(root or datasets_root(), "bccd")
    for name, split in BCCD_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        if os.path.isdir(dirname):
            register_voc_dataset(name, dirname, split, BCCD_CLASSES)
        else:
            DatasetCatalog.register(name, _missing_bccd_loader(name, dirname))
            MetadataCatalog.get(name).set(thing_classes=list(BCCD_CLASSES), evaluator_type="coco")


def _missing_bccd_loader(name: str, dirname: str):
    def load():
        source = (
            f"$D2KD_DATASETS is {os.environ['D2KD_DATASETS']!r}"
            if os.environ.get("D2KD_DATASETS")
            else f"the working directory is {os.getcwd()}"
        )
        raise DatasetFormatError(
            f"Dataset '{name}' needs the BCCD folder {dirname}, which does not exist ({source}). Set "
            "D2KD_DATASETS to the folder holding bccd/ (the repository's datasets/), or run from the "
            "repository root."
        )

    return load


def register_coco_dataset(name: str, json_file: str, image_root: str, class_names: Sequence[str] = ()):
    """Register a user's COCO-format json dataset; checks the paths before registering."""
    if not os.path.isfile(json_file):
        raise DatasetFormatError(f"COCO annotation file not found: {json_file}.")
    if not os.path.isdir(image_root):
        raise DatasetFormatError(f"COCO image folder not found: {image_root}.")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    metadata = {"thing_classes": list(class_names)} if class_names else {}
    # Detectron2's register_coco_instances, with a loader whose errors name the annotation.
    DatasetCatalog.register(name, lambda: load_coco_json_naming_bad_categories(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)


def load_coco_json_naming_bad_categories(json_file: str, image_root: str, name: str):
    """
    Detectron2's ``load_coco_json``; an annotation whose ``category_id`` is not in the file's
    ``categories`` raises :class:`DatasetFormatError` naming the file, the annotation id and the
    category id (Detectron2's ``KeyError`` names neither the file nor the annotation).
    """
    try:
        return load_coco_json(json_file, image_root, name)
    except KeyError as e:
        with open(json_file) as f:
            data = json.load(f)
        category_ids = sorted(c["id"] for c in data.get("categories", []))
        for annotation in data.get("annotations", []):
            if annotation.get("category_id") not in category_ids:
                raise DatasetFormatError(
                    f"{json_file}: annotation id {annotation.get('id')} (image id {annotation.get('image_id')}) has "
                    f"category_id {annotation.get('category_id')}, which is not among the file's 'categories' "
                    f"(ids {category_ids}). Add that category to 'categories' or fix the annotation's category_id."
                ) from e
        raise
