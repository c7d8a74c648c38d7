"""
How well a student fit the detection task itself during a run: the detector's own loss terms
and Detectron2's RoI-head accuracy on foreground proposals (``fast_rcnn/fg_cls_accuracy``),
as means over the whole run (how fast it learned) and over its last ``fraction`` of logged
iterations (where it ended), read from the run's ``metrics.json``.

Where a method hurts, the study asks why. A distilled run and the baseline run of
the same seed start from the same weights and see the same images in the same order, so their
difference in these numbers shows what the distillation term did to the detector's own
training: e.g. fewer foreground RoIs classified correctly during the run, or a larger
box-regression loss at its end (the accuracy report's "Detector fit" table).
"""

import os
from typing import Dict, List, Optional

from .common import markdown_table, mean_std
from .loss_balance import read_logged_iterations

__all__ = ["FIT_KEYS", "detector_fit", "detector_fit_lines"]

# Detectron2's Faster R-CNN training losses and its RoI-head foreground accuracy (FastRCNNOutputs).
FIT_KEYS = ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "fast_rcnn/fg_cls_accuracy")


def detector_fit(output_dir: str, fraction: float = 0.1) -> Optional[dict]:
    """
    Means of each :data:`FIT_KEYS` value a run logged, over all its logged training iterations
    (``run``) and over the last ``fraction`` of them (``end``, at least one). Unlike the loss
    balance, the windows count every iteration, warm-up included, so a baseline and a distilled
    run of one schedule are read over the same iterations. (The first iterations alone say
    little: the RoI head's foreground accuracy starts at 0 and jumps within a few dozen.)

    Returns ``{"run": {...}, "end": {...}}``, each with a mean per key the records carry and
    ``iterations`` ([first, last]); None without a ``metrics.json`` or training records.
    """
    path = os.path.join(output_dir, "metrics.json")
    records = read_logged_iterations(path) if os.path.isfile(path) else []
    if not records:
        return None
    n = max(1, int(round(len(records) * fraction)))
    return {"run": _means(records), "end": _means(records[-n:])}


def _means(records: List[dict]) -> dict:
    window = {}
    for key in FIT_KEYS:
        values = [float(r[key]) for r in records if key in r]
        if values:
            window[key] = sum(values) / len(values)
    window["iterations"] = [int(records[0]["iteration"]), int(records[-1]["iteration"])]
    return window


# The report's columns: (window, key, header).
FIT_COLUMNS = (
    ("run", "fast_rcnn/fg_cls_accuracy", "fg acc. run"),
    ("end", "fast_rcnn/fg_cls_accuracy", "fg acc. end"),
    ("run", "loss_cls", "loss_cls run"),
    ("end", "loss_cls", "loss_cls end"),
    ("run", "loss_box_reg", "loss_box_reg run"),
    ("end", "loss_box_reg", "loss_box_reg end"),
    ("end", "loss_rpn_cls", "loss_rpn_cls end"),
)


def detector_fit_lines(runs: List[dict]) -> List[str]:
    """
    The accuracy report's "Detector fit" table: the baseline's mean of each :data:`FIT_COLUMNS`
    value over its seeds, then for each distilled method the mean over seeds of (method -
    baseline) at the same seed. Runs without a recorded ``detector_fit`` are left out; nothing
    is returned without a baseline run that has one.
    """
    fits = [e for e in runs if e.get("detector_fit") and e.get("kind") in ("baseline", "distill")]
    base = {e["seed"]: e["detector_fit"] for e in fits if e["kind"] == "baseline"}
    if not base:
        return []
    base_means = [mean_std([fit[w].get(k) for fit in base.values()])[0] for w, k, _ in FIT_COLUMNS]
    rows = [["**baseline**", len(base)] + [_cell(mean) for mean in base_means]]
    by_method: Dict[str, List[dict]] = {}
    for e in fits:
        if e["kind"] == "distill" and e["seed"] in base:
            by_method.setdefault(e["method"], []).append(e)
    for method in sorted(by_method):
        pairs = by_method[method]
        cells = []
        for w, k, _ in FIT_COLUMNS:
            diffs = [e["detector_fit"][w].get(k) - base[e["seed"]][w][k] for e in pairs
                     if e["detector_fit"][w].get(k) is not None and base[e["seed"]][w].get(k) is not None]
            cells.append(_cell(mean_std(diffs)[0], signed=True))
        rows.append([method, len(pairs)] + cells)
    return [
        "Detector fit (from each run's metrics.json): the detector's own losses and the RoI head's accuracy "
        "on foreground proposals (`fast_rcnn/fg_cls_accuracy`), as means over all logged iterations (run) and "
        "over the last 10% of them (end). The baseline row is its mean over seeds; every other row is the mean "
        "over seeds of (method − baseline) at the same seed, so a distillation term that slowed the detector's own "
        "training shows as a lower accuracy or a higher loss than the baseline's.",
        "",
        markdown_table(["Method", "pairs"] + [h for _, _, h in FIT_COLUMNS], rows, align="lr" + "r" * len(FIT_COLUMNS)),
    ]


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
