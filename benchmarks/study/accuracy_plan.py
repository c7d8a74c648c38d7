"""
The accuracy study's plan (``benchmarks/accuracy.py``): its runs (the teacher, the baseline and
each method at each seed: :func:`plan_jobs`) and what to do with each, from its run folder
(:func:`plan_action`: harvest, resume or train) and the results; the schedule of
``--student-iters`` / ``--teacher-iters`` (:func:`scale_schedule_opts`); the checks on the
teacher (weights trained on the evaluated images; a teacher folder another process is training
into, found by a /proc scan); the few-image data set of ``--quick``.
"""

import json
import os
import time
from collections import OrderedDict
from typing import Dict, List, Optional

from d2kd.config import load_config

from .accuracy_jobs import QUICK_IMAGES, QUICK_SPLIT, Job
from .accuracy_provenance import teacher_changed_since_recorded
from .accuracy_results import find_entry
from .common import QUICK_INPUT_OPTS, datasets_dir, merge_opts


# A teacher folder whose metrics.json changed this recently is taken to be training now.
TEACHER_BUSY_SECONDS = 600


def scale_schedule_opts(cfg, iters: Optional[int]) -> List[str]:
    """Overrides setting MAX_ITER to ``iters`` and scaling the other iteration counts with it."""
    if iters is None or iters == cfg.SOLVER.MAX_ITER:
        return []
    if iters <= 0:
        raise SystemExit(f"Iteration counts must be positive, got {iters}.")
    ratio = iters / cfg.SOLVER.MAX_ITER
    steps = tuple(s for s in (int(round(s * ratio)) for s in cfg.SOLVER.STEPS) if 0 < s < iters)
    opts = [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        repr(steps),
        "SOLVER.WARMUP_ITERS",
        str(min(cfg.SOLVER.WARMUP_ITERS, max(1, int(round(cfg.SOLVER.WARMUP_ITERS * ratio))))),
        "SOLVER.CHECKPOINT_PERIOD",
        str(max(1, int(round(cfg.SOLVER.CHECKPOINT_PERIOD * ratio)))),
    ]
    if "DISTILL" in cfg and cfg.DISTILL.HEADS:
        if cfg.DISTILL.WARMUP_ITERS > 0:
            opts += ["DISTILL.WARMUP_ITERS", str(int(round(cfg.DISTILL.WARMUP_ITERS * ratio)))]
        if cfg.DISTILL.STOP_ITER >= 0:
            opts += ["DISTILL.STOP_ITER", str(int(round(cfg.DISTILL.STOP_ITER * ratio)))]
    return opts


def _final_iters(config: str, opts: List[str]) -> int:
    return int(load_config(config, opts).SOLVER.MAX_ITER)


def _read_run_config(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    from d2kd.files import read_yaml

    try:
        return read_yaml(path)  # plain data: a Python tag is refused, never run
    except Exception:
        return None


def _same_run(saved: Optional[dict], iterations: int, test_dataset: str, seed: Optional[int]) -> bool:
    """Whether the config saved in a run folder is the run we want."""
    if not saved:
        return False
    try:
        same = int(saved["SOLVER"]["MAX_ITER"]) == iterations and list(saved["DATASETS"]["TEST"]) == [test_dataset]
        return same and (seed is None or int(saved["SEED"]) == seed)
    except (KeyError, TypeError, ValueError):
        return False


def plan_action(output_dir: str, iterations: int, test_dataset: str, seed: Optional[int], force: bool = False):
    """
    What to do with a run folder: ``("harvest", why)`` if it holds this run's final weights and
    their evaluation, ``("resume", why)`` if it holds an interrupted run, ``("train", why)`` otherwise.
    """
    if force:
        return "train", "--force"
    final = os.path.join(output_dir, "model_final.pth")
    results = os.path.join(output_dir, "eval_results.json")
    saved = _read_run_config(output_dir)
    same = _same_run(saved, iterations, test_dataset, seed)
    if (
        os.path.isfile(final)
        and os.path.isfile(results)
        and same
        and os.path.getmtime(results) >= os.path.getmtime(final)
    ):
        return "harvest", "finished run found (model_final.pth + eval_results.json)"
    if os.path.isfile(os.path.join(output_dir, "last_checkpoint")) and same:
        return "resume", "interrupted run found (last_checkpoint)"
    if saved is not None and not same:
        return "train", "the folder holds a different run; starting over"
    return "train", "no previous run"


def bccd_image_ids(dataset: str) -> Optional[set]:
    """Image ids of a BCCD split (``bccd_train``, ``bccd_val``, ...), or None for another dataset."""
    from d2kd.data.builtin import BCCD_SPLITS
    from d2kd.data.voc import read_voc_split

    split = BCCD_SPLITS.get(dataset)
    return set(read_voc_split(os.path.join(datasets_dir(), "bccd"), split)) if split else None


def teacher_saw_eval_images(weights: str, eval_dataset: str) -> Optional[str]:
    """
    Why teacher weights must not serve a study evaluated on ``eval_dataset``: the run that wrote
    them (``config.yaml`` beside them, as Detectron2 saves it) trained on images of that split,
    e.g. the ``bccd_trainval`` teacher for a ``--eval-split val`` study, whose students would then
    learn validation labels through the teacher. None if not, or if it cannot be told (no
    ``config.yaml``, datasets other than BCCD's splits).
    """
    saved = _read_run_config(os.path.dirname(os.path.abspath(weights)))
    held_out = bccd_image_ids(eval_dataset)
    if not saved or not held_out:
        return None
    for train in (saved.get("DATASETS") or {}).get("TRAIN") or ():
        shared = (bccd_image_ids(str(train)) or set()) & held_out
        if shared:
            return (
                f"the teacher weights {weights} were trained on {train} (config.yaml beside them), which holds "
                f"{len(shared)} of the {len(held_out)} {eval_dataset} images this study evaluates on"
            )
    return None


def register_quick_datasets(root: str) -> Dict[str, str]:
    """A few BCCD images as ``bccd_quick_train`` / ``bccd_quick_test`` (links to the real files)."""
    from d2kd.data import BCCD_CLASSES, register_voc_dataset
    from d2kd.data.voc import read_voc_split

    src = os.path.abspath(os.path.join(datasets_dir(), "bccd"))
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    for sub in ("Annotations", "JPEGImages"):
        link = os.path.join(root, sub)
        if not os.path.exists(link):
            os.symlink(os.path.join(src, sub), link)
    for role, (split, n) in QUICK_IMAGES.items():
        ids = read_voc_split(src, split)[:n]
        with open(os.path.join(root, "ImageSets", "Main", f"quick_{role}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        register_voc_dataset(QUICK_SPLIT[role], root, f"quick_{role}", BCCD_CLASSES)
    return dict(QUICK_SPLIT)


def plan_jobs(
    args, methods: "OrderedDict[str, str]", split: Dict[str, str], work_root: str, results: dict
) -> List[Job]:
    """The teacher job, the baseline and the methods for every seed, with what to do for each."""
    quick = list(QUICK_INPUT_OPTS) if args.quick else []
    user = list(args.opts or [])
    teacher_config = args.teacher_config
    jobs: List[Job] = []

    # --- the teacher: trained once, or reused, or given; evaluated on the split
    teacher_cfg = load_config(teacher_config)
    teacher_seed = int(teacher_cfg.SEED)
    # The path the distill configs read the teacher from (the teacher config's own OUTPUT_DIR if no method).
    first = next(iter(methods.values()), None)
    configured = (
        load_config(first).DISTILL.TEACHER.WEIGHTS if first else os.path.join(teacher_cfg.OUTPUT_DIR, "model_final.pth")
    )
    if args.teacher_weights:
        weights, teacher_dir, trainable = args.teacher_weights, os.path.join(work_root, "teacher_eval"), False
    elif args.eval_split == "test" and not args.quick:
        weights = configured
        teacher_dir, trainable = os.path.dirname(weights), True
    else:
        teacher_dir = os.path.join(work_root, "teacher")
        weights, trainable = os.path.join(teacher_dir, "model_final.pth"), True
    leak = teacher_saw_eval_images(weights, split["test"])
    if leak:
        raise SystemExit(
            f"{leak[0].upper()}{leak[1:]}: distilled students would learn its labels through the teacher. "
            + (
                f"Drop --teacher-weights: the study then trains its own teacher on {split['train']}."
                if args.teacher_weights
                else f"Delete {teacher_dir} so the study trains its teacher again on {split['train']}."
            )
        )
    t_opts = merge_opts(
        scale_schedule_opts(teacher_cfg, args.teacher_iters),
        quick,
        _dataset_opts(teacher_cfg, split),
        user,
        ["OUTPUT_DIR", teacher_dir],
    )
    t_iters = _final_iters(teacher_config, t_opts)
    ours = os.path.abspath(teacher_dir).startswith(os.path.abspath(work_root) + os.sep)
    teacher = Job(
        "teacher",
        teacher_seed,
        "teacher",
        teacher_config,
        t_opts,
        teacher_dir,
        t_iters,
        extra={"weights": weights, "overwrite": ours},
    )
    if trainable and os.path.isfile(weights):
        saved = _read_run_config(teacher_dir)
        if saved:
            teacher.iterations = int(saved["SOLVER"]["MAX_ITER"])
            if args.teacher_iters and teacher.iterations != args.teacher_iters:
                print(
                    f"Note: reusing the teacher at {weights} ({teacher.iterations} iterations); "
                    "--teacher-iters ignored."
                )
        action, why = plan_action(teacher_dir, teacher.iterations, split["test"], None)
        teacher.action, teacher.reason = ("harvest", why) if action == "harvest" else ("eval", f"reusing {weights}")
    elif trainable:
        action, why = plan_action(teacher_dir, t_iters, split["test"], None)
        teacher.action, teacher.reason = action, why
        if not ours:
            _refuse_if_busy(teacher_dir, teacher, args.dry_run)
    else:
        teacher.action, teacher.reason = "eval", f"given weights {weights}"
    if teacher.action == "eval":
        teacher.kind = "teacher_eval"
        teacher.output_dir = os.path.join(work_root, "teacher_eval")
        teacher.opts = merge_opts(
            quick, _dataset_opts(teacher_cfg, split), user, ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", teacher.output_dir]
        )
    existing = find_entry(results, "teacher", teacher_seed)
    if existing and not args.force and existing.get("weights") == weights:
        if trainable and not os.path.isfile(weights):
            # A new machine (or a cleaned output/): the row stays the study's teacher; the weights
            # are trained again only if a distillation run below needs them (see the end).
            teacher.extra["keep_recorded_row"] = True
            teacher.reason = (
                f"in the results, but {weights} is missing: {teacher.action} it for the distillation runs "
                f"({teacher.reason}); the recorded teacher row is kept"
            )
        else:
            teacher.action, teacher.reason = "skip", "already in the results"
            changed = teacher_changed_since_recorded(existing, weights)
            if changed:
                print(
                    f"Warning: the teacher weights {weights} are not the ones the results' teacher row "
                    f"measured ({changed}). Distillation runs will use them; each records the teacher AP "
                    "it evaluated and the report lists the runs whose teacher differs."
                )
    jobs.append(teacher)

    # --- baseline and methods, per seed
    student_iters_cfg = load_config(args.student_config)
    runs = ([] if args.no_baseline else [("baseline", args.student_config, "baseline")]) + [
        (m, path, "distill") for m, path in methods.items()
    ]
    for method, config, kind in runs:
        cfg = load_config(config) if kind == "distill" else student_iters_cfg
        for seed in args.seeds:
            out = os.path.join(work_root, method, f"seed{seed}")
            teacher_opts = []
            if kind == "distill":
                teacher_opts = ["DISTILL.TEACHER.WEIGHTS", weights]
                if args.quick:  # the teacher's evaluation at the same small size
                    test_opts = dict(zip(QUICK_INPUT_OPTS[0::2], QUICK_INPUT_OPTS[1::2]))
                    test_opts = [x for k, v in test_opts.items() if k.endswith("_TEST") for x in (k, v)]
                    teacher_opts += ["DISTILL.TEACHER.OPTS", json.dumps(test_opts)]
            opts = merge_opts(
                scale_schedule_opts(cfg, args.student_iters),
                quick,
                _dataset_opts(cfg, split),
                ["SEED", str(seed)],
                teacher_opts,
                user,
                ["OUTPUT_DIR", out],
            )
            job = Job(
                method,
                seed,
                kind,
                config,
                opts,
                out,
                _final_iters(config, opts),
                extra={"num_gpus": args.num_gpus, "overwrite": True, "weights": weights if kind == "distill" else None},
            )
            existing = find_entry(results, method, seed)
            if existing and not args.force:
                if existing.get("iterations") != job.iterations:
                    raise SystemExit(
                        f"{os.path.basename(args._json)} already holds {method} seed {seed} trained for "
                        f"{existing.get('iterations')} iterations, not {job.iterations}: one results file never mixes "
                        "schedules. Pass --tag NAME to write a separate study, or --force to replace it."
                    )
                job.action, job.reason = "skip", "already in the results"
            else:
                job.action, job.reason = plan_action(out, job.iterations, split["test"], seed, args.force)
            jobs.append(job)
    if teacher.extra.get("keep_recorded_row") and not any(j.kind == "distill" and j.action != "skip" for j in jobs):
        teacher.action, teacher.reason = "skip", f"already in the results ({weights} is missing; no run here needs it)"
    for job in jobs:
        job.extra.setdefault("num_gpus", args.num_gpus)
        job.extra["threads"] = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None)
    if args.jobs > 1 and not args.threads and teacher_trains_alone(teacher, jobs):
        teacher.extra["threads"] = os.cpu_count() or 1
    return jobs


def teacher_trains_alone(teacher: Job, jobs: List[Job]) -> bool:
    """True when the teacher is trained and no other run can share the machine with it: every
    other run that trains is a distillation run, which waits for the teacher (a harvested run only
    reads its folder). ``--jobs N`` would give it only ``cpu_count // N`` threads and leave the rest
    of the CPU idle."""
    others = [job for job in jobs if job is not teacher and job.action not in ("skip", "harvest")]
    return teacher.action in ("train", "resume") and all(job.kind == "distill" for job in others)


def _dataset_opts(cfg, split: Dict[str, str]) -> List[str]:
    """Overrides of DATASETS.TRAIN/TEST where the config's differ from the split's."""
    opts = []
    for key, name in (("TRAIN", split["train"]), ("TEST", split["test"])):
        if tuple(cfg.DATASETS[key]) != (name,):
            opts += [f"DATASETS.{key}", f'("{name}",)']
    return opts


def _refuse_if_busy(teacher_dir: str, job: Job, dry_run: bool):
    """Never start a second training into a teacher folder another process is writing."""
    message = None
    pids = _training_processes(job.config)
    metrics = os.path.join(teacher_dir, "metrics.json")
    if pids:
        message = (
            f"Another train_net.py process is training {job.config} (pid {', '.join(map(str, pids))}; it may be "
            f"paused), presumably into {teacher_dir}, which has no model_final.pth yet."
        )
    elif os.path.isfile(metrics) and time.time() - os.path.getmtime(metrics) < TEACHER_BUSY_SECONDS:
        idle_at = time.strftime("%H:%M:%S", time.localtime(os.path.getmtime(metrics) + TEACHER_BUSY_SECONDS))
        message = (
            f"The teacher in {teacher_dir} looks like it is training right now (metrics.json changed "
            f"{int(time.time() - os.path.getmtime(metrics))} s ago) and has no model_final.pth yet. If its run "
            f"was interrupted (no process on this machine trains it), the same command resumes it from "
            f"{idle_at} on, when metrics.json is {TEACHER_BUSY_SECONDS} s old."
        )
    if message is None:
        return
    message += " Wait for it to finish, or pass --teacher-weights PATH."
    if not dry_run:
        raise SystemExit(message)
    job.reason += "; WARNING: " + message


def _training_processes(config: str) -> List[int]:
    """Ids of other processes running ``train_net.py`` (not --eval-only) on ``config`` (Linux /proc)."""
    pids = []
    name = os.path.basename(config)
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if any(a.endswith("train_net.py") for a in argv) and any(a.endswith(name) for a in argv):
            if "--eval-only" not in argv:
                pids.append(int(entry))
    return pids
