#!/usr/bin/env python
"""
Per-class recall of the RPN proposals of one or more checkpoints of a Faster R-CNN config on a
registered dataset (study.proposal_recall): the share of each class's boxes that one of
an image's top-k proposals covers at IoU >= 0.5.

    python benchmarks/proposal_recall.py --config-file configs/bccd/student_R18_FPN.yaml --dataset bccd_val \\
        --weights baseline=output/.../baseline/seed0/model_final.pth cwd=output/.../cwd/seed0/model_final.pth
"""

import argparse
import copy
import os
import sys
from typing import Dict

# The study package beside this script, and d2kd from a checkout that is not installed.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main(argv=None) -> Dict[str, Dict[int, Dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's config (a student's: its plain config)")
    parser.add_argument("--weights", nargs="+", required=True, help="NAME=PATH checkpoints of that model")
    parser.add_argument("--dataset", default="bccd_val", help="registered dataset")
    parser.add_argument("--top-k", type=int, nargs="+", default=[100, 1000], help="proposals per image")
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--max-images", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--output", default="", help="also write the tables and the command to this Markdown file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data.transforms import ResizeShortestEdge

    from d2kd import register_bccd
    from d2kd.config import load_config
    from d2kd.modeling.student_weights import load_student
    from study import datasets_dir, markdown_table, write_text
    from study.proposal_recall import covered_per_class

    register_bccd(datasets_dir())
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.DEVICE", "cpu"])
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = max(max(args.top_k), cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
    bad = [item for item in args.weights if "=" not in item]
    if bad:
        parser.error(f"--weights takes NAME=PATH items, got {bad}; put KEY VALUE overrides after a single-valued option")
    named = dict(item.split("=", 1) for item in args.weights)
    for name, path in named.items():
        if not os.path.isfile(path):
            parser.error(f"--weights {name}={path}: no such file")
    if args.dataset not in DatasetCatalog.list():
        parser.error(f"dataset '{args.dataset}' is not registered")
    dicts = DatasetCatalog.get(args.dataset)[: args.max_images or None]
    classes = MetadataCatalog.get(args.dataset).thing_classes
    # Every checkpoint sees the same inputs: each image at the config's test-time size, with its
    # ground truth in the resized coordinates (transform_instance_annotations edits its input).
    resize = ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for record in dicts:
        image = utils.read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        tfm = resize.get_transform(image)
        tensor = torch.as_tensor(tfm.apply_image(image).transpose(2, 0, 1).copy())
        gt = [utils.transform_instance_annotations(copy.deepcopy(a), [tfm], tensor.shape[1:]) for a in record["annotations"]]
        gt_boxes = torch.as_tensor(np.array([a["bbox"] for a in gt], dtype=np.float32)).reshape(-1, 4)
        inputs.append((tensor, gt_boxes, torch.tensor([a["category_id"] for a in gt], dtype=torch.int64)))
    results, lines = {}, []
    for name, path in named.items():
        model = load_student(cfg, path)
        totals = {k: {} for k in args.top_k}
        with torch.no_grad():
            for tensor, gt_boxes, gt_classes in inputs:
                images = model.preprocess_image([{"image": tensor}])
                proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
                counts = covered_per_class(proposals[0].proposal_boxes.tensor, gt_boxes, gt_classes, args.top_k, args.iou)
                for k, per_class in counts.items():
                    for cls, (hit, total) in per_class.items():
                        entry = totals[k].setdefault(cls, [0, 0])
                        entry[0] += hit
                        entry[1] += total
        results[name] = {k: {classes[c]: 100.0 * h / t for c, (h, t) in sorted(v.items())} for k, v in totals.items()}
    for k in args.top_k:
        rows = [[name] + [f"{results[name][k].get(c, float('nan')):.1f}" for c in classes] for name in named]
        lines += [f"Recall (%) of the top {k} proposals at IoU >= {args.iou} on {args.dataset} ({len(dicts)} images)", "",
                  markdown_table(["weights"] + list(classes), rows)]
    print("\n".join(lines))
    if args.output:
        from study import command_string

        made_by = command_string("benchmarks/proposal_recall.py", argv)
        write_text(args.output, "\n".join(lines + ["Made by:", "", "    " + made_by, ""]))
    return results


if __name__ == "__main__":
    main()
