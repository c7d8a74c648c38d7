#!/usr/bin/env python
"""
d2kd training script, used like Detectron2's tools/train_net.py.

    python train_net.py --config-file configs/bccd/distill_fitnet_R50_R18.yaml
    python train_net.py --config-file CFG --num-gpus 8
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python train_net.py --config-file CFG --eval-only --resume   # OUTPUT_DIR's last checkpoint
    python train_net.py --config-file CFG --resume
    python train_net.py --config-file CFG --check      # pre-flight check, one batch
    python train_net.py --config-file CFG --check --check-images 16

--eval-only loads the student strictly: no MODEL.WEIGHTS, or weights that do not fit the config's
student (missing, unexpected or mis-shaped keys), are an error; --allow-partial-weights evaluates
whatever loads instead.

A config without DISTILL.HEADS or DISTILL.INHERIT trains a plain detector (teachers and baselines). Without
GPUs, --num-gpus N runs N CPU processes with the gloo backend.

--check builds both models, runs one batch without updating anything and prints the capture
points and shapes, the adapters, every loss term next to the detector losses and the
teacher's AP on a few test images (d2kd.engine.check); it exits with status 1 on an error.
It writes into a temporary folder, never into OUTPUT_DIR.
"""

import json
import logging
import os
import shutil
import sys
import tempfile

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2kd import DistillTrainer, get_distill_cfg, register_bccd
from d2kd.data import datasets_root, register_config_datasets
from d2kd.config import uses_teacher
from d2kd.engine.checkpoint import atomic_write_bytes
from d2kd.engine.launch import launch
from d2kd.config import merge_config
from d2kd.engine.preflight import check_output_dir, check_output_dir_writable, set_aside_previous_run, validate_datasets
from d2kd.files import SafeDetectionCheckpointer
from d2kd.modeling.student_weights import load_student

logger = logging.getLogger("d2kd")


def setup(args):
    """
    The config of ``args`` (unknown keys and wrong types fail naming the closest key). A new
    training run refuses an OUTPUT_DIR holding another run before anything is written there, and
    every run one that cannot be written, before any model is built;
    with ``--overwrite`` the other run's files (logs, config.yaml, checkpoints, results) move
    to OUTPUT_DIR/previous_runs/<time>/. ``--check`` runs in a temporary folder.
    """
    cfg = get_distill_cfg()
    merge_config(cfg, args.config_file, args.opts)
    if getattr(args, "check", False):
        cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="d2kd_check_")
    elif comm.is_main_process():  # default_setup writes there next: fail first, naming the folder and the fix
        check_output_dir_writable(cfg.OUTPUT_DIR)
    if not getattr(args, "check", False) and not args.resume and not args.eval_only:
        check_output_dir(cfg, overwrite=getattr(args, "overwrite", False))
        if comm.is_main_process():  # before default_setup opens log.txt and writes config.yaml
            set_aside_previous_run(cfg.OUTPUT_DIR)
        comm.synchronize()
    cfg.freeze()
    default_setup(cfg, args)
    # d2kd's own log lines (teacher loading, heads, prototype progress) next to Detectron2's.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2kd", abbrev_name="d2kd")
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


def load_eval_model(cfg, args):
    """
    The student ``--eval-only`` evaluates: MODEL.WEIGHTS (with ``--resume``, OUTPUT_DIR's last
    checkpoint if there is one), loaded as strictly as the teacher: no weights, or missing,
    unexpected or mis-shaped keys are an error naming them. ``--allow-partial-weights`` loads
    what fits (Detectron2's behaviour, even a random model) with a warning.
    """
    checkpointer = SafeDetectionCheckpointer(None, save_dir=cfg.OUTPUT_DIR)
    weights = checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint() else cfg.MODEL.WEIGHTS
    if not getattr(args, "allow_partial_weights", False):
        return load_student(
            cfg, weights, allow_unexpected=False, opt_out="--allow-partial-weights evaluates whatever loads"
        )
    logger.warning(f"--allow-partial-weights: evaluating {weights or 'a randomly initialised student'} as loaded.")
    model = DistillTrainer.build_model(cfg)
    SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(weights)
    return model


def run_pre_flight_check(cfg, args):
    """``--check``: exit status 1 if the check finds an error."""
    from d2kd.engine.check import run_check

    report = run_check(cfg, num_images=args.check_images)
    if report.ok:
        shutil.rmtree(cfg.OUTPUT_DIR, ignore_errors=True)
    else:
        print(f"The check's log and files are kept in {cfg.OUTPUT_DIR}.", file=sys.stderr)
        raise SystemExit(1)
    return report


def main(args):
    register_bccd(datasets_root(default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")))
    if getattr(args, "check", False) and args.eval_only:
        raise ValueError("--check and --eval-only cannot be combined.")
    cfg = setup(args)
    register_config_datasets(cfg)  # DATASETS.DEFINE, in every process of a multi-process run
    if getattr(args, "check", False):
        return run_pre_flight_check(cfg, args)  # validates the datasets itself
    validate_datasets(cfg)

    if args.eval_only:
        model = load_eval_model(cfg, args)
        results = DistillTrainer.test(cfg, model)
        if cfg.DISTILL.EVAL_TEACHER and uses_teacher(cfg):
            results.update(DistillTrainer.test_teacher(cfg))
        write_results(cfg, results)
        return results

    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    write_results(cfg, trainer.last_eval_results)
    return results


def build_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow training into an OUTPUT_DIR that already holds checkpoints of another run",
    )
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="with --eval-only, evaluate whatever MODEL.WEIGHTS loads (missing, unexpected or mis-shaped keys "
        "only logged; no weights: a random model) instead of refusing",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="pre-flight check: build both models, run one batch, print captures, adapters, "
        "loss magnitudes and the teacher's AP on a few test images; exit 1 on an error",
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=8,
        help="number of DATASETS.TEST[0] images on which --check measures the teacher's AP (0: skip)",
    )
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args, file=sys.stderr)
    if args.check and args.num_gpus > 1:
        print("--check runs in one process; ignoring --num-gpus.", file=sys.stderr)
        args.num_gpus = 1
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
