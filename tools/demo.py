#!/usr/bin/env python
"""
The main job (`make demo`): on the embedded BCCD data, train a small teacher (reused when it
is already trained), distil a student from it, evaluate both on bccd_test and print their AP
side by side.

    python tools/demo.py                      # the demo configs (about 20 minutes on 2 cores)
    python tools/demo.py --teacher-config configs/bccd/teacher_R50_FPN.yaml \
        --distill-config configs/bccd/distill_kd_R50_R18.yaml     # the full-size pair

Training runs through train_net.py, so its progress (iteration, losses, ETA) is shown as it goes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _config_value(config_file, *keys):
    from d2kd.config import load_config_file

    cfg = load_config_file(config_file)
    for key in keys:
        cfg = cfg[key]
    return cfg


def _run(args, log_prefix):
    cmd = [sys.executable, os.path.join(REPO, "train_net.py")] + args
    print(f"\n[{log_prefix}] $ {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True)
    print(f"[{log_prefix}] done in {(time.time() - start) / 60:.1f} min", flush=True)


def ensure_teacher(teacher_config, teacher_weights):
    """Train the teacher unless its final weights exist; continue an interrupted run."""
    if os.path.isfile(teacher_weights):
        print(f"[teacher] reusing {teacher_weights}")
        return
    out_dir = os.path.dirname(teacher_weights)
    resume = os.path.isfile(os.path.join(out_dir, "last_checkpoint"))
    args = ["--config-file", teacher_config, "OUTPUT_DIR", out_dir]
    _run((["--resume"] if resume else []) + args, "teacher")


def read_results(out_dir):
    with open(os.path.join(out_dir, "eval_results.json")) as f:
        return json.load(f)


def format_table(results):
    rows = [("teacher", results.get("teacher/bbox", {})), ("student (distilled)", results.get("bbox", {}))]
    lines = ["| model | AP | AP50 | AP75 |", "|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in ("AP", "AP50", "AP75")) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-config", default="configs/bccd/demo/teacher_demo.yaml")
    parser.add_argument("--distill-config", default="configs/bccd/demo/distill_demo.yaml")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    start = time.time()

    teacher_weights = _config_value(args.distill_config, "DISTILL", "TEACHER", "WEIGHTS")
    ensure_teacher(args.teacher_config, teacher_weights)

    out_dir = _config_value(args.distill_config, "OUTPUT_DIR")
    _run(
        ["--config-file", args.distill_config, "--overwrite", "DISTILL.EVAL_TEACHER", "True", "OUTPUT_DIR", out_dir],
        "distill",
    )
    results = read_results(out_dir)
    table = format_table(results)
    print("\nBCCD test split, COCO-style box AP (teacher evaluated by the distillation run):\n")
    print(table)
    print(f"\nTotal time {(time.time() - start) / 60:.1f} min. Student weights: {out_dir}/model_final.pth")
    with open(os.path.join(out_dir, "demo_table.md"), "w") as f:
        f.write(table + "\n")
    return results


if __name__ == "__main__":
    main()
