#!/usr/bin/env python
"""
d2kd training script, used like Detectron2's tools/train_net.py.

    python train_net.py --config-file configs/bccd/distill_fitnet_R50_R18.yaml
    python train_net.py --config-file CFG --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python train_net.py --config-file CFG --resume
    python train_net.py --config-file CFG --check      # pre-flight check, one batch

A config without DISTILL.HEADS trains a plain detector (teachers and baselines). Without
GPUs, --num-gpus N runs N CPU processes with the gloo backend.
"""

import json
import logging
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

from d2kd import DistillTrainer, get_distill_cfg, register_bccd
from d2kd.engine.checkpoint import atomic_write_bytes
from d2kd.engine.preflight import check_output_dir, validate_datasets

logger = logging.getLogger("d2kd")


def setup(args):
    cfg = get_distill_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def write_results(cfg, results):
    """Write the last evaluation to OUTPUT_DIR/eval_results.json (atomically)."""
    if not comm.is_main_process() or not results:
        return
    path = os.path.join(cfg.OUTPUT_DIR, "eval_results.json")
    payload = json.dumps(_to_builtin(results), indent=2, sort_keys=True)
    atomic_write_bytes(path, lambda f: f.write(payload), mode="w")
    logger.info(f"Evaluation results written to {path}")


def _to_builtin(obj):
    if isinstance(obj, dict):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_builtin(v) for v in obj]
    return float(obj) if hasattr(obj, "__float__") and not isinstance(obj, (int, bool)) else obj


def main(args):
    register_bccd()
    cfg = setup(args)
    validate_datasets(cfg)

    if args.eval_only:
        model = DistillTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = DistillTrainer.test(cfg, model)
        if cfg.DISTILL.EVAL_TEACHER and cfg.DISTILL.HEADS:
            results.update(DistillTrainer.test_teacher(cfg))
        write_results(cfg, results)
        return results

    if not args.resume:
        check_output_dir(cfg, overwrite=args.overwrite)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    write_results(cfg, getattr(trainer, "_last_eval_results", None))
    return results


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow training into an OUTPUT_DIR that already holds checkpoints of another run",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args, file=sys.stderr)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
