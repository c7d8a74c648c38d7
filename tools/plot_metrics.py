#!/usr/bin/env python
"""
Plot the training curves of a run from its ``metrics.json`` (Detectron2's JSONWriter):
detector losses, every distillation term ``loss_kd_*`` and, if the run evaluated, AP of the
student beside the teacher's (``teacher/bbox/AP``).

    python tools/plot_metrics.py output/bccd/distill_fitnet_R50_R18
    python tools/plot_metrics.py output/.../metrics.json --output curves.png --smooth 20

A resumed run appends to metrics.json and may repeat iterations: the last record of each
iteration is kept. Writes a PNG (default: ``training_curves.png`` beside metrics.json).
"""

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["read_metrics", "plot_metrics", "main"]

DETECTOR_LOSSES = ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask", "loss_keypoint")
EVAL_KEYS = ("bbox/AP", "bbox/AP50", "teacher/bbox/AP", "teacher/bbox/AP50")


def read_metrics(path: str) -> "OrderedDict[int, Dict[str, float]]":
    """``iteration -> {key: value}`` from a metrics.json (one JSON object per line)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics file at {path}: pass a run's OUTPUT_DIR or its metrics.json.")
    records: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; anything else is reported.
                print(f"plot_metrics: skipping unreadable line {n} of {path}", file=sys.stderr)
                continue
            if "iteration" not in entry:
                continue
            it = int(entry.pop("iteration"))
            # Later lines win: a resumed run repeats the iterations after its last checkpoint.
            records.setdefault(it, {}).update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    if not records:
        raise ValueError(f"{path} holds no training records.")
    return OrderedDict(sorted(records.items()))


def _series(records, key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for it, values in records.items():
        v = values.get(key)
        if v is not None and math.isfinite(v):
            xs.append(it)
            ys.append(v)
    return xs, ys


def _smooth(ys: Sequence[float], window: int) -> List[float]:
    if window <= 1:
        return list(ys)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metrics(metrics: str, output: Optional[str] = None, smooth: int = 1, title: Optional[str] = None) -> str:
    """
    Plot ``metrics`` (a metrics.json or a run folder) into ``output`` (PNG); returns its path.
    Panels: detector losses and total; distillation terms; evaluation AP (if any).
    """
    records = read_metrics(metrics)
    keys = sorted({k for values in records.values() for k in values})
    detector = [k for k in DETECTOR_LOSSES if k in keys] + sorted(
        k for k in keys if k.startswith("loss_") and not k.startswith("loss_kd_") and k not in DETECTOR_LOSSES
    )
    if "total_loss" in keys:
        detector.append("total_loss")
    distill = [k for k in keys if k.startswith("loss_kd_")]
    evals = [k for k in EVAL_KEYS if k in keys]
    panels = [("Detector losses", detector), ("Distillation terms", distill), ("Evaluation (AP)", evals)]
    panels = [(name, ks) for name, ks in panels if ks]
    if not panels:
        raise ValueError(f"{metrics} has no loss or AP entries to plot (keys: {keys[:10]}).")

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False, sharex=True)
    for ax, (name, ks) in zip(axes[:, 0], panels):
        for k in ks:
            xs, ys = _series(records, k)
            if not xs:
                continue
            is_eval = name.startswith("Evaluation")
            style = "--" if k.startswith("teacher/") else "-"
            ax.plot(xs, ys if is_eval else _smooth(ys, smooth), style, marker="o" if is_eval else None,
                    markersize=3, label=k, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(ks) > 6 else 1, loc="best")
        if name.startswith("Distillation") and _spans_decades(records, ks):
            ax.set_yscale("log")  # per-level terms often differ by orders of magnitude
    folder = metrics if os.path.isdir(metrics) else os.path.dirname(os.path.abspath(metrics))
    fig.suptitle(title if title is not None else os.path.basename(os.path.abspath(folder)))
    fig.tight_layout()
    if output is None:
        output = os.path.join(folder, "training_curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _spans_decades(records, keys) -> bool:
    values = [v for k in keys for v in _series(records, k)[1] if v > 0]
    return bool(values) and max(values) / min(values) > 1e3


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's OUTPUT_DIR or its metrics.json")
    parser.add_argument("--output", "-o", default=None, help="PNG path (default: training_curves.png beside metrics.json)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window over iterations for losses")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    path = plot_metrics(args.metrics, args.output, args.smooth, args.title)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
