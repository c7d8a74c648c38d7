"""
How large the distillation terms were beside the detector's own losses in a finished run,
read from the run's ``metrics.json`` (Detectron2's JSONWriter: one JSON object per logged
iteration, losses median-smoothed over 20 iterations).

The accuracy study reports it per method so a method that hurts can be diagnosed
(loss scale at small inputs, warm-up, ...): a distillation loss many times the detector loss
at the start of training, or one that is negligible at the end, shows in these numbers.
"""

import json
import os
from typing import Dict, List, Optional

from d2kd.modeling.loss_balance import METRIC_PREFIX

__all__ = ["read_logged_iterations", "loss_balance"]

DISTILL_PREFIX = "loss_kd_"
# Terms that train only a head's own weighting parameters, never the student: HGD's learned
# macro weights add ``WEIGHT * sum_k s_k`` (``loss_kd_hgd_logvar``; Kendall et al., CVPR 2018),
# which turns negative as the weights grow. They are reported apart as ``regularizer`` so that
# ``distill`` is the imitation the student feels.
REGULARIZER_SUFFIXES = ("_logvar",)
# DISTILL.LOSS_BALANCE's fixed multipliers, one metric per head.
MULTIPLIER_PREFIX = METRIC_PREFIX


def read_logged_iterations(metrics_path: str) -> List[dict]:
    """
    The training records of ``metrics.json`` in iteration order, one per iteration (a resumed
    run appends records again from its checkpoint: the last record of an iteration wins).
    Evaluation-only records (no ``loss_*`` key) are skipped; unreadable lines are ignored.
    """
    by_iteration: Dict[int, dict] = {}
    with open(metrics_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "iteration" in record and any(k.startswith("loss_") for k in record):
                by_iteration[int(record["iteration"])] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def loss_balance(output_dir: str, fraction: float = 0.1) -> Optional[dict]:
    """
    Mean detector loss and mean distillation loss (sums of the ``loss_*`` and ``loss_kd_*``
    terms) over the first and the last ``fraction`` of the logged iterations in which a
    distillation term was non-zero (all logged iterations for a run without one).

    Returns ``{"start": {...}, "end": {...}}`` with ``detector``, ``distill``, ``ratio``
    (distill / detector) and ``iterations`` ([first, last]) each, or None without a
    ``metrics.json``. Terms named with a :data:`REGULARIZER_SUFFIXES` suffix are not in
    ``distill``; a run that logs one gets their mean as ``regularizer`` as well. A run with
    ``DISTILL.LOSS_BALANCE`` on also gets ``multipliers`` (``{head: multiplier}``, as last logged).
    Only plain ``loss_*`` names are losses: metrics named ``group/name`` (Detectron2's grouped
    metrics) are not summed.
    """
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    records = read_logged_iterations(path)
    active = [r for r in records if _distill_sum(r) != 0.0]
    records = active or records
    if not records:
        return None
    n = max(1, int(round(len(records) * fraction)))
    balance = {"start": _window(records[:n]), "end": _window(records[-n:])}
    multipliers = _last_multipliers(records)
    if multipliers:
        balance["multipliers"] = multipliers
    return balance


def _last_multipliers(records: List[dict]) -> Dict[str, float]:
    for record in reversed(records):
        found = {k[len(MULTIPLIER_PREFIX) :]: float(v) for k, v in record.items() if k.startswith(MULTIPLIER_PREFIX)}
        if found:
            return found
    return {}


def _is_loss(key: str) -> bool:
    return key.startswith("loss_") and "/" not in key


def _is_regularizer(key: str) -> bool:
    return _is_loss(key) and key.startswith(DISTILL_PREFIX) and key.endswith(REGULARIZER_SUFFIXES)


def _distill_sum(record: dict) -> float:
    return sum(float(v) for k, v in record.items() if _is_loss(k) and k.startswith(DISTILL_PREFIX) and not _is_regularizer(k))


def _regularizer_sum(record: dict) -> float:
    return sum(float(v) for k, v in record.items() if _is_regularizer(k))


def _detector_sum(record: dict) -> float:
    return sum(float(v) for k, v in record.items() if _is_loss(k) and not k.startswith(DISTILL_PREFIX))


def _window(records: List[dict]) -> dict:
    detector = sum(_detector_sum(r) for r in records) / len(records)
    distill = sum(_distill_sum(r) for r in records) / len(records)
    window = {
        "detector": detector,
        "distill": distill,
        "ratio": distill / detector if detector > 0 else None,
        "iterations": [int(records[0]["iteration"]), int(records[-1]["iteration"])],
    }
    if any(_is_regularizer(k) for r in records for k in r):
        window["regularizer"] = sum(_regularizer_sum(r) for r in records) / len(records)
    return window
