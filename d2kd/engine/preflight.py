"""Checks run before anything is built, so a bad setup fails in seconds with a clear message."""

import glob
import os

from detectron2.data import DatasetCatalog

__all__ = ["check_output_dir", "validate_datasets", "OutputDirError"]


class OutputDirError(RuntimeError):
    pass


def check_output_dir(cfg, overwrite: bool = False):
    """Refuse to train a new run into an OUTPUT_DIR that holds another run's checkpoints."""
    out = cfg.OUTPUT_DIR
    previous = glob.glob(os.path.join(out, "model_*.pth")) + glob.glob(os.path.join(out, "last_checkpoint"))
    if previous and not overwrite:
        raise OutputDirError(
            f"OUTPUT_DIR {out} already holds a previous run ({os.path.basename(sorted(previous)[0])}, ...). "
            "Pass --resume to continue it, --overwrite to start over in place, or set OUTPUT_DIR to a new folder."
        )


def validate_datasets(cfg):
    """Every dataset in DATASETS.TRAIN/TEST must be registered."""
    registered = set(DatasetCatalog.list())
    for field in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[field]:
            if name not in registered:
                user = sorted(n for n in registered if not n.startswith(("coco_", "lvis_", "keypoints_", "voc_", "cityscapes_", "ade20k_")))
                raise KeyError(
                    f"Dataset '{name}' in DATASETS.{field} is not registered. Registered here: {user} "
                    "(plus Detectron2's built-in COCO/LVIS/VOC names). Register your data with "
                    "d2kd.register_voc_dataset(...) or d2kd.register_coco_dataset(...) before training."
                )
