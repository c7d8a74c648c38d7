"""
The pre-flight check (``python train_net.py --config-file CFG --check``): catch a bad
distillation setup in a minute instead of after hours of training.

It builds the trainer exactly as training would (student, teacher, heads, adapters,
optimizer, data loader), runs one training forward and backward on one batch without
updating anything, and reports:

1. the capture points of student and teacher with the shapes recorded;
2. the heads' trainable modules (adapters, ...) with their parameter counts, and any
   trainable head parameter that received no gradient;
3. every loss term's initial magnitude, distillation terms next to the detector losses;
4. the teacher's AP on the first ``num_images`` images of ``DATASETS.TEST[0]``.

A build error, a non-finite term or a failed step is an error (``report.ok`` is False,
``train_net.py`` exits with status 1). A teacher AP near 0, a term that dwarfs or vanishes
beside the detector losses, and head parameters without gradient are warnings.
"""

import contextlib
import logging
import os
import shutil
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from ..config import uses_teacher
from ..modeling.distiller import DistillationModel
from ..modeling.inherit import InheritError, inherit_teacher_parameters
from ..modeling.loss_balance import LossBalance
from ..modeling.teacher import Teacher

__all__ = ["CheckReport", "run_check", "describe_shapes"]

logger = logging.getLogger(__name__)

# A teacher below this COCO AP (percent) on the check images is probably untrained.
MIN_TEACHER_AP = 1.0
# A distillation term outside [LOW, HIGH] x (sum of detector losses) deserves a look.
RATIO_HIGH = 100.0
RATIO_LOW = 1e-4


@dataclass
class CheckReport:
    """What the check found; ``ok`` is False if any error was recorded."""

    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    captures: Dict[str, Dict[str, str]] = field(default_factory=dict)  # role -> target -> shapes
    modules: Dict[str, int] = field(default_factory=dict)  # head module path -> trainable parameters
    losses: Dict[str, float] = field(default_factory=dict)
    # DISTILL.LOSS_BALANCE "initial": the multiplier of each head this batch's losses imply.
    loss_balance: Dict[str, float] = field(default_factory=dict)
    teacher_ap: Optional[float] = None
    teacher_results: Dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def describe_shapes(obj, max_items: int = 8) -> str:
    """A short text for a recorded output: tensor shapes inside dicts/lists, Instances sizes."""
    if torch.is_tensor(obj):
        return "x".join(str(s) for s in obj.shape) if obj.dim() else "scalar"
    if isinstance(obj, ImageList):
        return f"ImageList {describe_shapes(obj.tensor)}"
    if isinstance(obj, Instances):
        return f"Instances({len(obj)})"
    if isinstance(obj, Boxes):
        return f"Boxes({len(obj)})"
    if isinstance(obj, Mapping):
        items = [f"{k}: {describe_shapes(v, max_items)}" for k, v in list(obj.items())[:max_items]]
        more = ", ..." if len(obj) > max_items else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(obj, (list, tuple)):
        items = [describe_shapes(v, max_items) for v in list(obj)[:max_items]]
        more = ", ..." if len(obj) > max_items else ""
        return "[" + ", ".join(items) + more + "]"
    if obj is None:
        return "None"
    return type(obj).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _head_units(head: nn.Module, prefix: str):
    """
    The trainable parts of a head worth naming: d2kd/user modules (adapters, blocks) at any
    depth, and torch modules sitting directly in the head or in a container.
    """
    containers = (nn.ModuleDict, nn.ModuleList)
    out = []

    def visit(module, path, parent_is_container):
        for name, child in module.named_children():
            n = _count(child)
            if n == 0:
                continue
            child_path = f"{path}.{name}"
            own_class = not type(child).__module__.startswith("torch.")
            if isinstance(child, containers):
                visit(child, child_path, True)
            elif own_class or parent_is_container:
                out.append((child_path, type(child).__name__, n))
                if own_class:
                    visit(child, child_path, False)

    visit(head, prefix, True)
    return out


class _Printer:
    def __init__(self, log: Callable[[str], None], steps: int):
        self.log, self.steps, self.step = log, steps, 0
        self.t0 = time.perf_counter()

    def phase(self, text: str):
        self.step += 1
        self.log(f"[check {self.step}/{self.steps}] {text} ...")
        self.t0 = time.perf_counter()

    def done(self, text: str = "done"):
        self.log(f"    {text} ({time.perf_counter() - self.t0:.1f} s)")


def run_check(cfg, num_images: int = 8, log: Callable[[str], None] = None, trainer_class=None) -> CheckReport:
    """
    Run the pre-flight check of ``cfg`` (a frozen or unfrozen distillation config). Writes
    only under ``cfg.OUTPUT_DIR`` (train_net.py points it at a temporary folder). Never
    raises for a problem of the setup: errors are in the returned report.

    Args:
        num_images: images of ``DATASETS.TEST[0]`` on which the teacher's AP is measured
            (0 skips the evaluation).
        log: where the report goes line by line (default ``print``).
        trainer_class: the trainer to build (default :class:`DistillTrainer`).
    """
    if log is None:
        def log(text):
            print(text, flush=True)
    if trainer_class is None:
        from .trainer import DistillTrainer as trainer_class

    report = CheckReport()
    has_teacher = uses_teacher(cfg)  # heads, or DISTILL.INHERIT alone: a random teacher is worth a warning
    evaluate_teacher = has_teacher and num_images > 0 and len(cfg.DATASETS.TEST) > 0
    printer = _Printer(log, 3 + int(evaluate_teacher))

    def fail(what: str, error: BaseException):
        known = type(error).__module__.startswith("d2kd") or isinstance(error, (FileNotFoundError, KeyError, ValueError))
        report.errors.append(f"{what}: {type(error).__name__}: {error}")
        if not known:
            log(traceback.format_exc())

    # 1. Build everything as training would.
    printer.phase(f"building the student, the teacher and the heads {list(cfg.DISTILL.HEADS)}")
    try:
        from .preflight import validate_datasets

        validate_datasets(cfg)
        trainer = trainer_class(cfg)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        fail("building the trainer", e)
        return _finish(report, log)
    printer.done()
    model = _unwrap(trainer.model)
    distiller = model if isinstance(model, DistillationModel) else None  # None: no distillation heads
    heads = trainer.heads
    if has_teacher:
        log(f"    teacher: {cfg.DISTILL.TEACHER.CONFIG_FILE} with weights {cfg.DISTILL.TEACHER.WEIGHTS}")
        log(f"    teacher input: {trainer.teacher_cfg.INPUT.FORMAT}, student input: {cfg.INPUT.FORMAT}; "
            f"teacher input scale {cfg.DISTILL.TEACHER.INPUT_SCALE}")
        if distiller is not None:
            log(f"    teacher parts run each step: {sorted(distiller.teacher_runner.parts) or 'none'}")
    if cfg.DISTILL.INHERIT.ENABLED:
        try:
            inherited = inherit_teacher_parameters(trainer.student, trainer.teacher, cfg.DISTILL.INHERIT.PREFIXES)
        except InheritError as e:
            fail("DISTILL.INHERIT", e)
            return _finish(report, log)
        log(f"    DISTILL.INHERIT: {inherited.summary()}")
    elif not has_teacher:
        log("    DISTILL.HEADS is empty: a plain detector (no teacher, no distillation terms).")

    # 2. One batch.
    printer.phase("reading one training batch")
    try:
        batch = next(iter(trainer.data_loader))
    except Exception as e:  # noqa: BLE001
        fail("reading a training batch", e)
        return _finish(report, log)
    sizes = [tuple(x["image"].shape[-2:]) for x in batch]
    boxes = [len(x["instances"]) if "instances" in x else 0 for x in batch]
    printer.done(f"{len(batch)} images, sizes {sizes}, boxes per image {boxes}")

    # 3. One training forward and backward, no update.
    # The first iteration at which every head distils (after DISTILL.WARMUP_ITERS and any head's own warm-up).
    iteration = max(int(cfg.DISTILL.WARMUP_ITERS), distiller.heads_warmup_iters, 0) if distiller is not None else 0
    when = f"at iteration {iteration}, distillation on" if distiller is not None else "plain detector"
    printer.phase(f"one training step without update ({when})")
    # The step runs with the paper weights: DISTILL.LOSS_BALANCE would multiply the heads' terms
    # by MEASURE_MULTIPLIER (0 by default) here; the multipliers this batch implies come below.
    with contextlib.ExitStack() as stack:
        if distiller is not None:
            stack.enter_context(distiller.keeping_last_step())
            stack.enter_context(distiller.paper_weights())
        try:
            model.train()
            with EventStorage(iteration):
                _run_head_hooks_before_train(trainer, iteration, log)
                loss_dict = trainer.model(batch)
                total = sum(loss_dict.values())
                trainer.optimizer.zero_grad()
                total.backward()
        except Exception as e:  # noqa: BLE001
            fail("the training step", e)
            return _finish(report, log)
    printer.done()

    step = distiller.last_step if distiller is not None else None
    if step is not None:
        _report_captures(report, distiller.capture_targets, step.records, log)
    _report_modules(report, heads, log)
    _report_losses(report, loss_dict, log)
    if step is not None:
        _report_loss_balance(report, cfg, step.terms, log)
    trainer.optimizer.zero_grad()

    # 4. The teacher's AP on a few test images.
    if evaluate_teacher:
        _check_teacher_ap(report, trainer, cfg, num_images, printer, log, fail)
    elif has_teacher:
        log("    teacher AP not measured (DATASETS.TEST empty or --check-images 0).")
    return _finish(report, log)


def _run_head_hooks_before_train(trainer, iteration, log):
    """
    ``before_train`` of the heads' own hooks (e.g. GKD's prototype generation), so the step
    sees the state training would start from.
    """
    hooks = trainer.head_hooks
    if not hooks:
        return
    trainer.iter = iteration
    for h in hooks:
        log(f"    running {type(h).__name__}.before_train ...")
        h.before_train()


def _report_captures(report, capture_targets, step_records, log):
    """What the recorders handed to the heads in the step (``step_records``: role -> Records)."""
    if not any(capture_targets.values()):
        return
    log("Capture points (what the heads read):")
    for role, targets in capture_targets.items():
        records = step_records.get(role)
        shown = OrderedDict()
        for target in targets:
            if records is None or target not in records:
                shown[target] = "not recorded in this step"
                continue
            outputs = records.outputs(target)
            text = describe_shapes(outputs[0]) if len(outputs) == 1 else f"{len(outputs)} calls: {describe_shapes(outputs)}"
            shown[target] = text
        report.captures[role] = dict(shown)
        if not shown:
            log(f"  {role}: nothing captured")
        for target, text in shown.items():
            log(f"  {role:7s} {target}: {text}")


def _report_modules(report, heads, log):
    if not len(heads):
        return
    log("Trainable head modules (adapters, ...), built before the optimizer:")
    for name, head in heads.items():
        total = _count(head)
        log(f"  {name}: {total:,} trainable parameters")
        for path, cls, n in _head_units(head, name):
            report.modules[path] = n
            log(f"    {path} ({cls}): {n:,}")
        unused = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            report.warnings.append(
                f"Head '{name}': {len(unused)} trainable parameter(s) received no gradient in the check step "
                f"({unused[:4]}{' ...' if len(unused) > 4 else ''}). They are not used by its loss (under DDP this "
                "needs find_unused_parameters), or the head was inactive in this step."
            )
        nonfinite = [n for n, p in head.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if nonfinite:
            report.errors.append(f"Head '{name}': non-finite gradients in {nonfinite[:4]}.")


def _report_losses(report, loss_dict, log):
    values = OrderedDict((k, float(v.detach().float().sum()) if torch.is_tensor(v) else float(v)) for k, v in loss_dict.items())
    report.losses = dict(values)
    detector = {k: v for k, v in values.items() if not k.startswith("loss_kd_")}
    distill = {k: v for k, v in values.items() if k.startswith("loss_kd_")}
    detector_total = sum(v for v in detector.values() if v == v and abs(v) != float("inf"))
    log("Initial loss terms:")
    for k, v in detector.items():
        log(f"  {k:32s} {v:12.5g}")
    log(f"  {'detector total':32s} {detector_total:12.5g}")
    for k, v in distill.items():
        ratio = v / detector_total if detector_total else float("nan")
        log(f"  {k:32s} {v:12.5g}   ({ratio:.3g} x detector total)")
    for k, v in values.items():
        if v != v or abs(v) == float("inf"):
            report.errors.append(
                f"Loss term {k} is {v} at the first step: the run would stop at once. Check the head's "
                "options, the teacher's weights and the adapter shapes printed above."
            )
    for k, v in distill.items():
        if v != v or abs(v) == float("inf") or not detector_total:
            continue
        ratio = abs(v) / detector_total
        if v == 0:
            report.warnings.append(f"{k} is exactly 0 at the first step: the term may never act (check its inputs and weight).")
        elif ratio > RATIO_HIGH:
            report.warnings.append(f"{k} is {ratio:.3g} x the detector losses: it may swamp detection; consider a lower weight.")
        elif ratio < RATIO_LOW:
            report.warnings.append(f"{k} is only {ratio:.3g} x the detector losses: it may have no effect; check its weight.")


def _report_loss_balance(report, cfg, head_terms, log):
    """
    DISTILL.LOSS_BALANCE "initial": the multipliers this one batch implies (the run measures
    ITERS batches), from the step's ``head_terms`` (head -> term -> value, before any multiplier).
    """
    opts = cfg.DISTILL.LOSS_BALANCE
    if opts.MODE != "initial" or not head_terms:
        return
    balance = LossBalance(list(head_terms), "initial", opts.TARGET, 1, opts.MAX_MULTIPLIER)
    detector = {k: torch.tensor(v) for k, v in report.losses.items() if not k.startswith("loss_kd_")}
    balance.observe(head_terms, detector)
    report.loss_balance = balance.as_dict()
    log(
        f"DISTILL.LOSS_BALANCE initial (target {opts.TARGET} x the detector loss): on this batch the multipliers "
        f"would be {', '.join(f'{k} {v:.3g}' for k, v in report.loss_balance.items())}; the run fixes them from "
        f"the mean over its first {opts.ITERS} iterations with distillation on (the heads' terms x "
        f"MEASURE_MULTIPLIER {opts.MEASURE_MULTIPLIER} meanwhile)."
    )


def _check_teacher_ap(report, trainer, cfg, num_images, printer, log, fail):
    from ..data.subset import register_subset_dataset

    source = cfg.DATASETS.TEST[0]
    name = f"{source}__d2kd_check_{num_images}"
    printer.phase(f"evaluating the teacher on the first {num_images} images of {source}")
    try:
        register_subset_dataset(name, source, num_images)
        eval_cfg = cfg.clone()
        eval_cfg.defrost()
        eval_cfg.DATASETS.TEST = (name,)
        eval_cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "check_teacher_eval")
        shutil.rmtree(eval_cfg.OUTPUT_DIR, ignore_errors=True)  # no stale COCO-json cache
        results = trainer.test_teacher(eval_cfg, Teacher(trainer.teacher, trainer.teacher_cfg))
    except Exception as e:  # noqa: BLE001
        fail("evaluating the teacher", e)
        return
    bbox = results.get("teacher/bbox", {})
    report.teacher_results = dict(results)
    ap = bbox.get("AP")
    report.teacher_ap = None if ap is None else float(ap)
    printer.done(f"teacher bbox AP {ap if ap is None else f'{ap:.2f}'}, AP50 {bbox.get('AP50', float('nan')):.2f}")
    if ap is None or ap != ap or ap < MIN_TEACHER_AP:
        report.warnings.append(
            f"The teacher's AP on {num_images} images of {source} is {ap}: the teacher may be untrained, "
            "or DISTILL.TEACHER.WEIGHTS / CONFIG_FILE may not match (wrong classes, input format or "
            "resolution). Distilling from it will not help the student."
        )


def _finish(report, log):
    for w in report.warnings:
        log(f"WARNING: {w}")
    for e in report.errors:
        log(f"ERROR: {e}")
    if report.ok:
        log(f"CHECK PASSED ({len(report.warnings)} warning(s)).")
    else:
        log(f"CHECK FAILED ({len(report.errors)} error(s)).")
    return report
