"""
Where the teacher-student gap lives, and where a method gains or loses it: the per-class AP
(``AP-<class>``, Detectron2's COCOEvaluator) and the small-object AP (``APs``) of each run.

A method's mean AP can hide a loss on one class under gains on others. On BCCD's test split
the teacher's lead over the student is largest on Platelets, the smallest objects, so a method
that costs Platelets AP works against the gap it is meant to close (docs/accuracy_study.md,
"Where the gap lives: per class" and "A shorter schedule"). The report's "Per-class AP" table shows the teacher's and the baseline's AP per
class, the gap between them, and each method's gain per class paired by seed, as the main
table pairs AP.
"""

from typing import Dict, List, Optional

from .common import fmt_mean_std, markdown_table, mean_std

__all__ = ["per_class_keys", "per_class_lines"]

# Detectron2's size-split AP; APs is the one that tracks the smallest classes.
SIZE_KEYS = ("APs",)


def per_class_keys(runs: List[dict]) -> List[str]:
    """The ``AP-<class>`` metric names any run recorded (sorted), then :data:`SIZE_KEYS`."""
    classes = sorted({k for e in runs for k in (e.get("metrics") or {}) if k.startswith("AP-")})
    sizes = [k for k in SIZE_KEYS if any(k in (e.get("metrics") or {}) for e in runs)]
    return classes + sizes if classes else []


def per_class_lines(runs: List[dict], methods: Optional[List[str]] = None) -> List[str]:
    """
    The accuracy report's "Per-class AP" table: the teacher's and the baseline's mean per
    class over their runs, the gap (teacher − baseline), then for each distilled method the
    mean ± std over seeds of (method − baseline) at the same seed. ``methods`` orders the
    method rows (default: sorted by name). Nothing without per-class metrics or a baseline.
    """
    keys = per_class_keys(runs)
    base = {e["seed"]: e["metrics"] for e in runs if e.get("kind") == "baseline" and e.get("metrics")}
    if not keys or not base:
        return []
    teacher = [e["metrics"] for e in runs if e.get("kind") == "teacher" and e.get("metrics")]
    base_means = [mean_std([m.get(k) for m in base.values()])[0] for k in keys]
    rows = []
    if teacher:
        teacher_means = [mean_std([m.get(k) for m in teacher])[0] for k in keys]
        rows.append(["**teacher**", len(teacher)] + [fmt_mean_std(v) for v in teacher_means])
    rows.append(["**baseline**", len(base)] + [fmt_mean_std(v) for v in base_means])
    if teacher:
        gaps = [None if t is None or b is None else t - b for t, b in zip(teacher_means, base_means)]
        rows.append(["gap (teacher − baseline)", "–"] + [fmt_mean_std(v, signed=True) for v in gaps])
    by_method: Dict[str, List[dict]] = {}
    for e in runs:
        if e.get("kind") == "distill" and e.get("metrics") and e["seed"] in base:
            by_method.setdefault(e["method"], []).append(e)
    order = [m for m in (methods or sorted(by_method)) if m in by_method]
    for method in order:
        pairs = by_method[method]
        cells = []
        for k in keys:
            diffs = [e["metrics"][k] - base[e["seed"]][k] for e in pairs
                     if e["metrics"].get(k) is not None and base[e["seed"]].get(k) is not None]
            mean, std = mean_std(diffs)
            cells.append(fmt_mean_std(mean, std, signed=True))
        rows.append([method, len(pairs)] + cells)
    headers = [k[3:] if k.startswith("AP-") else k for k in keys]
    return [
        "Per-class AP (COCO-style AP of each class, and APs of small objects): the teacher's and the baseline's "
        "mean over their runs and the gap between them; every other row is the mean ± std over seeds of "
        "(method − baseline) at the same seed, so a method that gains on one class and loses on another shows it.",
        "",
        markdown_table(["Method", "pairs"] + headers, rows, align="lr" + "r" * len(keys)),
    ]

