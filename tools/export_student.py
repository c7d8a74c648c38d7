#!/usr/bin/env python
"""
Export the student of a finished d2kd run for deployment, and print its deploy card.

    python tools/export_student.py output/bccd/distill_fitnet_R50_R18
    python tools/export_student.py RUN_DIR --format onnx --sample-image img.jpg --output deploy/

RUN_DIR must hold the run's config.yaml and model_final.pth. Writes RUN_DIR/export/ (or
--output): model_final.pth with only the student ("model"), student_config.yaml for plain
Detectron2 (plus student_config_d2kd.yaml for a backbone d2kd registers, e.g. MobileNetV2),
model.ts (TorchScript, traced as Detectron2's tools/deploy/export_model.py does) and, with
--format onnx, model.onnx when the onnx package is installed. It checks that the TorchScript
model's boxes and scores match the PyTorch model on the sample image (default: the first image
of the run's DATASETS.TEST, else of bccd_test), prints the largest difference, then the deploy
card: AP (RUN_DIR/eval_results.json), parameters, GFLOPs and ms per image on this machine.

The exported student then runs in plain Detectron2::

    cfg = get_cfg(); cfg.merge_from_file("RUN_DIR/export/student_config.yaml")
    predictor = DefaultPredictor(cfg)
"""

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import d2kd  # noqa: F401  registers the heads' config keys and d2kd's backbones
from d2kd import register_bccd
from d2kd.config import load_config
from d2kd.data import datasets_root, register_config_datasets
from d2kd.deploy import check_run_dir, deploy_card, export_student

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished d2kd run: its OUTPUT_DIR")
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript",
                        help="torchscript (default), or onnx: model.onnx too (TorchScript is always written)")
    parser.add_argument("--sample-image", default=None, help="image for the checks and the timings")
    parser.add_argument("--output", default=None, help="output folder (default RUN_DIR/export)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per model (median reported)")
    return parser


def register_run_datasets(run_dir: str):
    """BCCD and the run's DATASETS.DEFINE, for the default sample image and the class names."""
    register_bccd(datasets_root(default=os.path.join(REPO, "datasets")))
    config_file, _ = check_run_dir(run_dir)
    try:
        register_config_datasets(load_config(config_file))
    except Exception as e:  # the run's data need not be on the export machine
        logging.getLogger("d2kd").warning(f"The run's DATASETS.DEFINE could not be registered: {e}")


def main(argv: Optional[Sequence[str]] = None):
    args = build_parser().parse_args(argv)
    try:
        register_run_datasets(args.run_dir)
        result = export_student(args.run_dir, args.output, args.format, args.sample_image, runs=args.runs)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"export_student: {e}", file=sys.stderr)
        raise SystemExit(1)
    for message in result.messages:
        print(message)
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in result.max_diff.items())
    print(f"TorchScript vs PyTorch on {result.sample_image} ({result.num_detections} detections): "
          f"largest |difference| {diffs}")
    print(deploy_card(result))
    return result


if __name__ == "__main__":
    main()
