#!/usr/bin/env python
"""
Trace the first iterations of a training run step by step, to see why it diverges: after
every step, every loss term and head scalar (e.g. ``gkd/robust_weight_resp``), the gradient
norm of each module group and the largest absolute weight of each group, one JSON line per
iteration, printed as a short line too.

    python benchmarks/trace_steps.py --config-file configs/bccd/distill_gkd_R50_R18.yaml --iters 100 \\
        --output trace.jsonl SEED 0 DISTILL.TEACHER.WEIGHTS output/bccd/teacher_R50_FPN/model_final.pth

The run is the one ``train_net.py`` would make with the same config and options (same seed,
data order, learning-rate schedule and hooks, e.g. GKD's prototype updates), stopped after
``--iters`` steps without the final evaluation. Detectron2's divergence error ("Predicted boxes
or scores contain Inf/NaN") ends the trace and is recorded as its last line. Single process;
``OUTPUT_DIR`` defaults to a temporary folder. Metrics are Detectron2's (``EventStorage``):
the detector's and each head's loss terms as the trainer sums them.
"""

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # d2kd from a checkout that is not installed

__all__ = ["module_group", "group_statistics", "trace", "main"]


def module_group(parameter_name: str, depth: int) -> str:
    """The first ``depth`` dotted parts of a parameter name: ``student.roi_heads.box_head``."""
    return ".".join(parameter_name.split(".")[:depth])


def group_statistics(
    named_parameters: Iterable[Tuple[str, torch.Tensor]], depth: int
) -> Dict[str, Dict[str, Optional[float]]]:
    """
    Per module group (:func:`module_group`): ``grad_norm``, the L2 norm of all its parameters'
    gradients together (``None`` if none has a gradient), and ``max_abs``, its largest
    absolute weight.
    """
    squares: Dict[str, float] = {}
    largest: Dict[str, float] = {}
    for name, p in named_parameters:
        group = module_group(name, depth)
        largest[group] = max(largest.get(group, 0.0), float(p.detach().abs().max()) if p.numel() else 0.0)
        if p.grad is not None:
            squares[group] = squares.get(group, 0.0) + float(p.grad.detach().double().pow(2).sum())
    return {
        g: {"grad_norm": math.sqrt(squares[g]) if g in squares else None, "max_abs": largest[g]} for g in largest
    }


def _step_record(trainer, depth: int) -> dict:
    record = {"iteration": trainer.iter}
    for key, (value, it) in trainer.storage.latest().items():
        if it == trainer.iter and ("loss" in key or "/" in key or key == "lr"):
            record[key] = float(value)
    record["groups"] = group_statistics(trainer.model.named_parameters(), depth)
    return record


def _summary(record: dict) -> str:
    groups = record["groups"]
    with_grad = [(g, s["grad_norm"]) for g, s in groups.items() if s["grad_norm"] is not None]
    top_grad = max(with_grad, key=lambda kv: kv[1], default=("-", float("nan")))
    top_weight = max(groups.items(), key=lambda kv: kv[1]["max_abs"])
    terms = sorted(((k, v) for k, v in record.items() if k.startswith("loss")), key=lambda kv: -abs(kv[1]))[:3]
    return (
        f"iter {record['iteration']:>5}  total {record.get('total_loss', float('nan')):.4g}  "
        + "  ".join(f"{k} {v:.4g}" for k, v in terms)
        + f"  | grad {top_grad[0]} {top_grad[1]:.3g}  | max |w| {top_weight[0]} {top_weight[1]['max_abs']:.3g}"
    )


def trace(cfg, iters: int, output: str, depth: int = 3, resume: bool = False) -> List[dict]:
    """
    Train ``cfg`` (a frozen d2kd config) for ``iters`` steps with :class:`~d2kd.DistillTrainer`
    and its hooks, writing one record per step to ``output`` (JSON lines, flushed each step).
    Returns the records; a last ``{"iteration", "diverged"}`` record if Detectron2 stopped the
    run as diverged.
    """
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from d2kd import DistillTrainer

    if iters < 1:
        raise ValueError(f"--iters must be >= 1, got {iters}.")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # as train_net.py's default_setup (rank 0)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    records = []
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as out, EventStorage(trainer.start_iter) as trainer.storage:
        trainer.before_train()
        # TrainerBase.train's loop, stopped early and without after_train (no final evaluation).
        for trainer.iter in range(trainer.start_iter, min(trainer.start_iter + iters, trainer.max_iter)):
            trainer.before_step()
            try:
                trainer.run_step()
            except FloatingPointError as e:
                record = {"iteration": trainer.iter, "diverged": str(e)}
            else:
                trainer.after_step()
                record = _step_record(trainer, depth)
            records.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(f"iter {trainer.iter:>5}  DIVERGED: {record['diverged']}" if "diverged" in record else _summary(record),
                  flush=True)
            if "diverged" in record:
                break
    return records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a train_net.py config")
    parser.add_argument("--iters", type=int, required=True, help="steps to trace from the start (or the checkpoint)")
    parser.add_argument("--output", default="trace.jsonl", help="JSON lines file, one record per step")
    parser.add_argument("--depth", type=int, default=3, help="dotted name parts that make a module group")
    parser.add_argument("--resume", action="store_true", help="start from OUTPUT_DIR's last checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, as for train_net.py")
    return parser


def main(argv=None) -> List[dict]:
    from detectron2.utils.logger import setup_logger

    from d2kd import register_bccd
    from d2kd.config import load_config
    from d2kd.data import datasets_root
    from d2kd.engine.preflight import validate_datasets

    args = build_parser().parse_args(argv)
    register_bccd(datasets_root(default=os.path.join(REPO, "datasets")))
    setup_logger(name="d2kd")
    cfg = load_config(args.config_file, args.opts)
    if "OUTPUT_DIR" not in args.opts[::2]:
        cfg.OUTPUT_DIR = tempfile.mkdtemp(prefix="d2kd_trace_")
    cfg.freeze()
    validate_datasets(cfg)
    return trace(cfg, args.iters, args.output, args.depth, args.resume)


if __name__ == "__main__":
    records = main()
    sys.exit(1 if records and "diverged" in records[-1] else 0)
