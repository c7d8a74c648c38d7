from .builtin import BCCD_CLASSES, datasets_root, register_bccd, register_coco_dataset
from .voc import DatasetFormatError, load_voc_detection, register_voc_dataset
from .config_datasets import register_config_datasets

__all__ = [k for k in globals().keys() if not k.startswith("_")]
