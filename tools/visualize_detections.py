#!/usr/bin/env python
"""
Draw the teacher's and the student's detections side by side (and the ground truth, when the
image comes from a registered dataset), with Detectron2's Visualizer. Writes one PNG per image.

    # an image file; the teacher comes from DISTILL.TEACHER of the config
    python tools/visualize_detections.py --config-file configs/bccd/distill_fitnet_R50_R18.yaml \\
        --student-weights output/bccd/distill_fitnet_R50_R18/model_final.pth \\
        --image datasets/bccd/JPEGImages/BloodImage_00000.jpg --output det.png

    # images 0..3 of a registered dataset, with the ground truth as a third panel
    python tools/visualize_detections.py --config-file CFG --dataset bccd_test --indices 0 1 2 3 \\
        --output-dir vis/

--student-weights defaults to OUTPUT_DIR/model_final.pth. Each model sees the image through its
own test-time resize and channel order. Trailing KEY VALUE pairs override the config.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence

import cv2
import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from d2kd import get_distill_cfg, register_bccd
from d2kd.config import merge_config
from d2kd.data import datasets_root
from d2kd.modeling.student_weights import load_student
from d2kd.modeling.teacher import build_teacher

__all__ = ["load_student", "predict", "draw_panel", "visualize", "main"]

TITLE_HEIGHT = 28


@torch.no_grad()
def predict(model, model_cfg, image_bgr: np.ndarray):
    """Detections of ``model`` on a BGR uint8 image, with the test-time resize of ``model_cfg``."""
    image = image_bgr if model_cfg.INPUT.FORMAT == "BGR" else image_bgr[:, :, ::-1]
    height, width = image.shape[:2]
    aug = T.ResizeShortestEdge([model_cfg.INPUT.MIN_SIZE_TEST] * 2, model_cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
    model.eval()
    return model([{"image": tensor, "height": height, "width": width}])[0]["instances"].to("cpu")


def _with_title(panel_rgb: np.ndarray, title: str) -> np.ndarray:
    bar = np.full((TITLE_HEIGHT, panel_rgb.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (6, TITLE_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel_rgb], axis=0)


def draw_panel(image_rgb, metadata, title: str, instances=None, dataset_dict=None, score_thresh: float = 0.5):
    """One titled panel: predictions (``instances``) or ground truth (``dataset_dict``)."""
    vis = Visualizer(image_rgb, metadata, scale=1.0)
    if dataset_dict is not None:
        drawn = vis.draw_dataset_dict(dataset_dict)
        count = len(dataset_dict.get("annotations", []))
        title = f"{title} ({count} boxes)"
    else:
        instances = instances[instances.scores >= score_thresh]
        drawn = vis.draw_instance_predictions(instances)
        title = f"{title} ({len(instances)} >= {score_thresh:g})"
    return _with_title(drawn.get_image(), title)


def visualize(
    cfg,
    student_weights: str,
    images: Sequence,
    output_paths: Sequence[str],
    score_thresh: float = 0.5,
    teacher=None,
    student=None,
) -> List[str]:
    """
    Draw ground truth (for dataset dicts), teacher and student side by side for each of
    ``images`` (file paths or Detectron2 dataset dicts) into ``output_paths`` (PNG).
    The teacher (a :class:`~d2kd.modeling.teacher.Teacher`) is built from ``cfg.DISTILL.TEACHER``
    unless given; no teacher if the config has no DISTILL.TEACHER.CONFIG_FILE.
    """
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    metadata = MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")
    student = student if student is not None else load_student(cfg, student_weights)
    if teacher is None and cfg.DISTILL.TEACHER.CONFIG_FILE:
        teacher = build_teacher(cfg)
    written = []
    for image, out in zip(images, output_paths):
        dataset_dict = image if isinstance(image, dict) else None
        path = dataset_dict["file_name"] if dataset_dict else image
        image_bgr = read_image(path, format="BGR")
        image_rgb = image_bgr[:, :, ::-1]
        panels = []
        if dataset_dict is not None:
            panels.append(draw_panel(image_rgb, metadata, "ground truth", dataset_dict=dataset_dict))
        if teacher is not None:
            panels.append(draw_panel(image_rgb, metadata, "teacher", predict(teacher.model, teacher.cfg, image_bgr), score_thresh=score_thresh))
        panels.append(draw_panel(image_rgb, metadata, "student", predict(student, cfg, image_bgr), score_thresh=score_thresh))
        gap = np.full((panels[0].shape[0], 8, 3), 255, dtype=np.uint8)
        row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if not cv2.imwrite(out, np.ascontiguousarray(row[:, :, ::-1])):
            raise OSError(f"Could not write {out} (is the extension .png?).")
        written.append(out)
    return written


def build_cfg(config_file: str, opts: Sequence = ()):
    cfg = get_distill_cfg()
    merge_config(cfg, config_file, opts)
    cfg.MODEL.DEVICE = cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu"
    cfg.freeze()
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the distillation config (teacher from DISTILL.TEACHER)")
    parser.add_argument("--student-weights", default=None, help="default: OUTPUT_DIR/model_final.pth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", nargs="+", help="image file(s)")
    source.add_argument("--dataset", help="a registered dataset (draws its ground truth too)")
    parser.add_argument("--indices", type=int, nargs="+", default=[0], help="images of --dataset to draw")
    parser.add_argument("--output", default=None, help="PNG path (one image)")
    parser.add_argument("--output-dir", default="detections", help="folder for several images")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    register_bccd(datasets_root(default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets")))
    cfg = build_cfg(args.config_file, args.opts)
    weights = args.student_weights or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if args.image:
        images = list(args.image)
        stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    else:
        if args.dataset not in DatasetCatalog.list():
            raise KeyError(f"Dataset '{args.dataset}' is not registered.")
        dicts = DatasetCatalog.get(args.dataset)
        bad = [i for i in args.indices if not 0 <= i < len(dicts)]
        if bad:
            raise IndexError(f"--indices {bad} out of range: {args.dataset} has {len(dicts)} images.")
        images = [dicts[i] for i in args.indices]
        stems = [f"{args.dataset}_{i}" for i in args.indices]
    if args.output and len(images) == 1:
        outputs = [args.output]
    else:
        outputs = [os.path.join(args.output_dir, f"{stem}.png") for stem in stems]
    written = visualize(cfg, weights, images, outputs, args.score_thresh)
    for path in written:
        print(f"Wrote {path}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
