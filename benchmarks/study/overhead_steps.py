"""
The training steps ``benchmarks/overhead.py`` times and ``benchmarks/profile_overhead.py``
profiles: the same batches for every phase (:func:`take_batches`), a plain student with its
optimizer (:func:`build_plain_student`), a method's real distillation wiring
(:func:`build_distillation`: heads, adapters, optimizer, head hooks), one training step
(:func:`train_step`), the student records the teacher's RoI work needs (:func:`student_records`)
and the teacher weights to time with (:func:`teacher_weights_for`).
"""

import itertools
import os
import time
from typing import Dict, List

import torch


def take_batches(cfg, n: int) -> List[list]:
    """``n`` training batches of the student's loader (the same for every phase)."""
    from d2kd import DistillTrainer

    loader = DistillTrainer.build_train_loader(cfg)
    batches = list(itertools.islice(iter(loader), n))
    del loader
    return batches


def _teacher_model(cfg, tmpdir: str, cache: Dict[str, dict]) -> dict:
    """The method's teacher, built once per teacher config: its parameter names and the path
    of its random initialisation (the model itself is not kept: it would count in memory)."""
    key = cfg.DISTILL.TEACHER.CONFIG_FILE + repr(list(cfg.DISTILL.TEACHER.OPTS))
    if key not in cache:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        from d2kd.modeling.teacher import build_teacher_cfg

        torch.manual_seed(0)
        model = build_model(build_teacher_cfg(cfg))
        name = f"teacher_random_{len(cache)}"
        DetectionCheckpointer(model, save_dir=tmpdir).save(name)
        cache[key] = {"keys": set(model.state_dict()), "random": os.path.join(tmpdir, name + ".pth")}
        del model
    return cache[key]


def _checkpoint_keys(path: str) -> set:
    from d2kd.files import read_checkpoint

    checkpoint = read_checkpoint(path)  # no code runs from the file
    return set(checkpoint.get("model", checkpoint))


def teacher_weights_for(cfg, choice: str, tmpdir: str, cache: Dict[str, dict]):
    """
    (path, description) of the teacher weights for a method config. A given file is used
    for the methods whose teacher it fits (the same parameter names); methods with another
    teacher (e.g. the RetinaNet presets beside Faster R-CNN ones) fall back to ``auto``.
    """
    entry = _teacher_model(cfg, tmpdir, cache)
    mismatch = ""
    if choice not in ("auto", "random"):
        if not os.path.isfile(choice):
            raise SystemExit(f"--teacher-weights {choice}: no such file.")
        if _checkpoint_keys(choice) == entry["keys"]:
            return choice, f"given ({choice})"
        mismatch = f"; {choice} is another architecture than {cfg.DISTILL.TEACHER.CONFIG_FILE}"
        choice = "auto"
    configured = cfg.DISTILL.TEACHER.WEIGHTS
    if choice == "auto" and configured and os.path.isfile(configured):
        return configured, f"trained ({configured}){mismatch}"
    return (
        entry["random"],
        f"random initialisation (timing only; no trained teacher at DISTILL.TEACHER.WEIGHTS){mismatch}",
    )


def build_plain_student(cfg):
    from detectron2.modeling import build_model

    from d2kd import DistillTrainer

    torch.manual_seed(0)
    student = build_model(cfg)
    student.train()
    return student, DistillTrainer.build_optimizer(cfg, student)


def build_distillation(cfg):
    """The method's trainer (real wiring: heads, adapters, optimizer, head hooks); returns parts."""
    from detectron2.utils.events import EventStorage

    from d2kd import DistillTrainer

    trainer = DistillTrainer(cfg)
    model = trainer._trainer.model
    model = getattr(model, "module", model)
    head_hooks = [h for h in trainer._hooks if _is_head_hook(h)]
    it = _first_active_iteration(model.schedule, cfg.SOLVER.MAX_ITER)
    setup_seconds = 0.0
    if head_hooks:  # e.g. prototypes a head needs before its first step
        start = time.perf_counter()
        with EventStorage(it) as storage:
            trainer.storage, trainer.iter, trainer.start_iter = storage, it, it
            for h in head_hooks:
                h.before_train()
        setup_seconds = time.perf_counter() - start
    return trainer, model, trainer.optimizer, it, setup_seconds


def _is_head_hook(hook) -> bool:
    """Hooks a head added (e.g. GKD's prototype generation); not Detectron2's or the trainer's own."""
    if type(hook).__module__.startswith("detectron2."):
        return False
    try:
        from d2kd.engine.hooks import NonFiniteLossGuard
    except ImportError:  # pragma: no cover
        return True
    return not isinstance(hook, NonFiniteLossGuard)


def _first_active_iteration(schedule, max_iter: int) -> int:
    for it in range(max(1, max_iter)):
        if schedule(it) > 0:
            return it
    return 0


def train_step(model, optimizer, batch, autocast=None):
    """
    One training step. ``autocast`` (a dtype) runs the forward and the loss sum under
    ``torch.autocast`` in it, backward and the optimizer step on the fp32 parameters outside, as
    d2kd's mixed-precision trainers do (``d2kd.engine.amp``).
    """
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        losses = model(batch)
        loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return losses


def student_records(dm, batch):
    """What the student records in a step (its sampled proposals etc.), computed untimed."""
    with torch.no_grad(), dm.student_recorder.recording():
        dm.student(batch)
    return dm.student_recorder.pop()
