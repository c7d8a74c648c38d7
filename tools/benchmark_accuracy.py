#!/usr/bin/env python
"""
Accuracy study on BCCD: the R50 teacher, the R18 student baseline and the student distilled
with every method preset, over several seeds; COCO-style AP, AP50, AP75.

    python tools/benchmark_accuracy.py                         # every method, seeds 0 1 2, bccd_test
    python tools/benchmark_accuracy.py --methods kd fitnet --seeds 0 1
    python tools/benchmark_accuracy.py --eval-split val        # tuning: train bccd_train, eval bccd_val
    python tools/benchmark_accuracy.py --dry-run               # print the plan and the commands
    python tools/benchmark_accuracy.py --report-only           # redraw the table/chart from the JSON
    python tools/benchmark_accuracy.py --quick --output-dir /tmp/q   # seconds-long smoke run

Methods are the files ``configs/bccd/distill_<method>_R50_R18.yaml`` present at run time.
Every run is ``python train_net.py --config-file <config> SEED <s> OUTPUT_DIR <dir> ...``
(a subprocess by default, ``--in-process`` to call ``train_net.main``); train_net writes
``OUTPUT_DIR/eval_results.json`` after training, which is what is recorded.

Results accumulate in ``<output-dir>/bccd_accuracy[_val][_<tag>].json``, one entry per
(method, seed) with the command, config, iterations, wall time, date and git commit; a
(method, seed) already there is skipped unless ``--force``; an interrupted training is
continued with ``--resume``. The Markdown table (mean +- sample std over seeds, gain over the
baseline, fraction of the teacher-student gap closed) and a bar chart are written beside it.

The teacher is trained once: in the default (test) study it lives at the path the distill
configs read (``output/bccd/teacher_R50_FPN/model_final.pth``) and is reused when present.
Where the results hold a teacher row but its weights are gone (a new machine), the weights are
trained again only when a distillation run needs them; the recorded row stays the study's
teacher, and each run records the teacher AP it was distilled from.
The validation study (``--eval-split val``) trains its own teacher on ``bccd_train`` so no
number used for tuning has seen ``bccd_val``; never tune on ``bccd_test``. Teacher weights whose
run trained on images of the evaluated split (the ``config.yaml`` beside them names a
``DATASETS.TRAIN`` that shares images with it, e.g. the ``bccd_trainval`` teacher given with
``--teacher-weights`` to a validation study) are refused before anything runs.

``--student-iters`` / ``--teacher-iters`` change MAX_ITER and scale SOLVER.STEPS,
SOLVER.CHECKPOINT_PERIOD, DISTILL.WARMUP_ITERS and DISTILL.STOP_ITER in proportion; the
iterations are recorded with each result, and one results file never mixes schedules (use
``--tag`` for a second schedule).
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from d2kd.benchmark import (  # noqa: E402
    RESULTS_DIR,
    METRICS,
    render_chart,
    render_markdown,
    QUICK_INPUT_OPTS,
    REPO_ROOT,
    METHOD_CONFIG_PATTERN,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    BCCD_CONFIG_DIR,
    Progress,
    command_string,
    discover_methods,
    split_method_pattern,
    study_methods,
    fmt_duration,
    git_info,
    run_from_repo_root,
    load_cfg,
    detector_fit,
    loss_balance,
    read_logged_iterations,
    merge_opts,
    run_with_dependencies,
    provenance,
    read_json,
    select_names,
    write_json,
    utc_now,
    write_text,
)

SCRIPT = "tools/benchmark_accuracy.py"
SPLITS = {
    "test": {"train": "bccd_trainval", "test": "bccd_test"},
    "val": {"train": "bccd_train", "test": "bccd_val"},
}
QUICK_SPLIT = {"train": "bccd_quick_train", "test": "bccd_quick_test"}
QUICK_IMAGES = {"train": ("train", 4), "test": ("test", 2)}
# Relative cost of one iteration, only for the ETA (R50 step vs R18 step vs distillation step).
COST = {"teacher": 2.5, "baseline": 1.0, "distill": 1.8, "teacher_eval": 0.0}
# A teacher folder whose metrics.json changed this recently is taken to be training now.
TEACHER_BUSY_SECONDS = 600


class RunFailed(RuntimeError):
    pass


@dataclass
class Job:
    """One training (or evaluation) run of the study."""

    method: str  # "teacher", "baseline" or a method name
    seed: int
    kind: str  # "teacher", "baseline", "distill" or "teacher_eval"
    config: str
    opts: List[str]
    output_dir: str
    iterations: int
    action: str = ""  # skip / harvest / resume / train / eval
    reason: str = ""
    extra: Dict = field(default_factory=dict)

    @property
    def key(self):
        return (self.method, self.seed)

    @property
    def label(self):
        return "teacher" if self.kind in ("teacher", "teacher_eval") else f"{self.method} seed {self.seed}"

    def train_net_args(self) -> List[str]:
        args = ["--config-file", self.config]
        if self.action == "eval":
            args.append("--eval-only")
        elif self.action == "resume":
            args.append("--resume")
        elif self.action == "train" and self.extra.get("overwrite"):
            args.append("--overwrite")
        if self.extra.get("num_gpus", 1) != 1:
            args += ["--num-gpus", str(self.extra["num_gpus"])]
        return args + [str(o) for o in self.opts]

    def command(self) -> str:
        import shlex

        return shlex.join(["python", "train_net.py"] + self.train_net_args())


# ----------------------------------------------------------------------------- arguments


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", nargs="+", help="methods to run (default: every configs/bccd/distill_<method>_R50_R18.yaml)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="SEED values (default: 0 1 2; --quick: 0)")
    p.add_argument("--no-baseline", action="store_true", help="do not run the student baseline")
    p.add_argument(
        "--baseline-from",
        metavar="JSON",
        help="copy the student baseline runs of another study's results file (same student config, "
        "schedule and split) for the seeds this study lacks, e.g. a variants study reusing the main "
        "study's baselines",
    )
    p.add_argument(
        "--method-configs",
        default=os.path.join(BCCD_CONFIG_DIR, METHOD_CONFIG_PATTERN),
        help="where methods are discovered; {method} is the method name "
        "(e.g. 'configs/bccd/hgd_variants/{method}.yaml')",
    )
    p.add_argument(
        "--student-config", default=STUDENT_CONFIG, help="the baseline; methods must distil into this student"
    )
    p.add_argument("--teacher-config", default=TEACHER_CONFIG, help="the teacher; methods must distil from it")
    p.add_argument(
        "--eval-split",
        choices=sorted(SPLITS),
        default="test",
        help="test: train bccd_trainval, evaluate bccd_test (report). val: train bccd_train, "
        "evaluate bccd_val (tuning; its own teacher)",
    )
    p.add_argument("--student-iters", type=int, help="override SOLVER.MAX_ITER of student runs (schedule scaled)")
    p.add_argument("--teacher-iters", type=int, help="override SOLVER.MAX_ITER of the teacher (if it is trained here)")
    p.add_argument(
        "--teacher-weights", help="use these teacher weights (not trained here); it is evaluated on the split"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run (method, seed) pairs already in the results (a teacher whose model_final.pth exists is "
        "re-evaluated, never retrained: delete it to retrain)",
    )
    p.add_argument("--tag", default="", help="suffix of the results name (a second schedule, an ablation)")
    p.add_argument(
        "--output-dir",
        help="where the JSON/Markdown/PNG go (default benchmarks/results; " "--quick: output/benchmarks/quick)",
    )
    p.add_argument("--work-dir", help="where runs train (default output/benchmarks; --quick: <output-dir>/work)")
    p.add_argument(
        "--in-process", action="store_true", help="call train_net.main in this process (default: a subprocess per run)"
    )
    p.add_argument("--num-gpus", type=int, default=1, help="passed to train_net.py")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; --quick: 1); " "subprocess runs get OMP_NUM_THREADS",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained side by side (subprocesses; default 1). Each gets --threads or else "
        "cpu_count // jobs threads (a teacher trained with no baseline beside it gets cpu_count); "
        "distillation runs start once the teacher is trained",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite the Markdown table and chart from the JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 method, 1 seed, 2 iterations, 128 px, a few images, in-process",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides appended to every run")
    return p


# ----------------------------------------------------------------------------- schedule


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
    return int(load_cfg(config, opts).SOLVER.MAX_ITER)


# ----------------------------------------------------------------------------- run folders


def _read_run_config(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    try:
        import yaml

        with open(path) as f:
            return yaml.unsafe_load(f)
    except Exception:
        return None


def _same_schedule(entry: dict) -> bool:
    """Whether the entry's output directory still holds its run: its last training record is the last iteration."""
    path = os.path.join(entry["output_dir"], "metrics.json")
    records = read_logged_iterations(path) if os.path.isfile(path) else []
    return bool(records) and int(records[-1]["iteration"]) + 1 == entry.get("iterations")


def _invocation(argv) -> dict:
    """What the results file records of one run of this script: its command, date and commit."""
    found = provenance()
    return {"command": command_string(SCRIPT, argv), "date": found["date"], "git": found["git"]}


BASELINE_IDENTITY = ("config", "config_sha1", "iterations", "train_dataset", "test_dataset")


def baselines_from_another_cpu(results: dict, seeds: List[int], cpu: str) -> Optional[str]:
    """
    A warning when baseline runs of ``seeds`` (just copied by ``--baseline-from``) were trained
    on another CPU kind than ``cpu``, this machine's, on which this study trains its methods:
    a from-scratch run did not repeat across CPU kinds here (docs/accuracy_study.md), so those
    pairs would hold machine noise. None when every copied baseline ran on ``cpu`` (or is unknown).
    """
    other = sorted(
        (e["seed"], e["cpu"])
        for e in results.get("runs", [])
        if e.get("kind") == "baseline" and e["seed"] in seeds and e.get("cpu") and e["cpu"] != cpu
    )
    if not other:
        return None
    listed = ", ".join(f"seed {seed} on {their_cpu}" for seed, their_cpu in other)
    return (
        f"WARNING: copied baselines ran on another CPU kind than this machine ({cpu}): {listed}. "
        "Runs trained here pair with them across machines (the report will name those pairs). "
        "To pair on one machine, train the baseline here: drop --baseline-from and --no-baseline, "
        "and pass --force with those --seeds (it also re-runs the listed methods at those seeds)."
    )


def import_baselines(results: dict, store: "ResultsFile", source_path: str, student_config: str) -> List[int]:
    """
    Copy into ``store`` the baseline runs of the results file ``source_path`` for the seeds
    ``results`` has no baseline of, marked ``imported_from``; return those seeds. Every source
    baseline must be the same run design as this study's baselines (or, without any, use
    ``student_config`` on this study's test split): otherwise the pairing would be meaningless.
    """
    source = read_json(source_path)
    if not source:
        raise SystemExit(f"--baseline-from: no results in {source_path}.")
    own = [e for e in results.get("runs", []) if e.get("kind") == "baseline"]
    reference = {k: own[0].get(k) for k in BASELINE_IDENTITY} if own else {
        "config": student_config, "test_dataset": results.get("test_dataset", source.get("test_dataset"))}
    have = {e["seed"] for e in own}
    imported = []
    for entry in source.get("runs", []):
        if entry.get("kind") != "baseline":
            continue
        differ = [f"{k} {entry.get(k)!r} != {v!r}" for k, v in reference.items() if entry.get(k) != v]
        if differ:
            raise SystemExit(
                f"--baseline-from {source_path}: baseline seed {entry['seed']} is another run design than "
                f"this study's baseline ({'; '.join(differ)}). Use a results file of the same student, "
                "schedule and split, or let this study train its own baseline."
            )
        if entry["seed"] not in have:
            copied = dict(entry, imported_from=source_path)
            store_entry(results, copied)  # the plan sees it now; the file gets it at the next write
            store.add_run(copied)
            imported.append(entry["seed"])
    return imported


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


# ----------------------------------------------------------------------------- runners


class SubprocessRunner:
    """Runs ``python train_net.py ARGS`` in the repository root; its output goes to a log file."""

    poll_seconds = 30
    report_seconds = 300

    def run(self, job: Job, log_path: str):
        cmd = [sys.executable, os.path.join(REPO_ROOT, "train_net.py")] + job.train_net_args()
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        start = last_report = time.time()
        last_it = None
        with open(log_path, "a") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.command()}\n")
            log.flush()
            env = dict(os.environ)
            if job.extra.get("threads"):
                env["OMP_NUM_THREADS"] = str(job.extra["threads"])
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=self.poll_seconds)
                        break
                    except subprocess.TimeoutExpired:
                        if time.time() - last_report >= self.report_seconds:
                            last_report = time.time()
                            it = _last_iteration(job.output_dir)
                            if it is not None and it != last_it:
                                last_it = it
                                done = it + 1 >= job.iterations
                                what = "training done, evaluating" if done else f"iteration {it + 1}/{job.iterations}"
                                print(
                                    f"    ... {job.label}: {what} ({fmt_duration(time.time() - start)} into this run)",
                                    flush=True,
                                )
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if rc != 0:
            raise RunFailed(f"train_net.py exited with {rc}; last lines of {log_path}:\n{_tail(log_path)}")


class InProcessRunner:
    """Calls ``train_net.main`` in this process (used by --quick and the tests)."""

    _train_net = None

    def run(self, job: Job, log_path: str):
        if job.extra.get("num_gpus", 1) != 1:
            raise SystemExit("--in-process runs one process; drop --num-gpus or --in-process.")
        train_net = self._load_train_net()
        args = train_net.build_parser().parse_args(job.train_net_args())
        loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore", "d2kd", "d2")]
        before = {lg.name: list(lg.handlers) for lg in loggers}
        try:
            train_net.main(args)
        except Exception as e:
            raise RunFailed(f"{type(e).__name__}: {e}") from e
        finally:
            _remove_new_handlers(loggers, before)

    @classmethod
    def _load_train_net(cls):
        if cls._train_net is None:
            spec = importlib.util.spec_from_file_location("d2kd_train_net", os.path.join(REPO_ROOT, "train_net.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            cls._train_net = module
        return cls._train_net


def _remove_new_handlers(loggers, before):
    """default_setup adds a log file per OUTPUT_DIR; drop them so later runs do not write there."""
    from detectron2.utils.logger import setup_logger

    for lg in loggers:
        for h in list(lg.handlers):
            if h not in before[lg.name]:
                lg.removeHandler(h)
                h.close()
    setup_logger.cache_clear()


def _last_iteration(output_dir: str) -> Optional[int]:
    path = os.path.join(output_dir, "metrics.json")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["iteration"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- results


def read_eval_results(output_dir: str) -> Dict[str, Dict[str, float]]:
    """``{"bbox": {...}, "teacher/bbox": {...}}`` as train_net wrote it (NaN -> None)."""
    path = os.path.join(output_dir, "eval_results.json")
    if not os.path.isfile(path):
        raise RunFailed(f"{path} was not written: the run did not evaluate (is DATASETS.TEST set?).")
    with open(path) as f:
        data = json.load(f)
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in value.items()}
    if "bbox" not in out:
        raise RunFailed(f"{path} has no 'bbox' results (keys: {sorted(data)}).")
    return out


def find_entry(results: dict, method: str, seed: int) -> Optional[dict]:
    for entry in results.get("runs", []):
        if entry["method"] == method and entry["seed"] == seed:
            return entry
    return None


def store_entry(results: dict, entry: dict):
    runs = [e for e in results.setdefault("runs", []) if (e["method"], e["seed"]) != (entry["method"], entry["seed"])]
    runs.append(entry)
    order = {"teacher": 0, "baseline": 1}
    runs.sort(key=lambda e: (order.get(e["method"], 2), e["method"], e["seed"]))
    results["runs"] = runs


class ResultsFile:
    """
    The study's JSON file, written by merging: each :meth:`write` re-reads the file and puts
    this process's runs (:meth:`add_run`) and invocation into it, so two study processes
    writing the same file (e.g. two ``--threads 1`` studies side by side) keep each other's
    runs; a run of the same method and seed is replaced. ``results`` is updated in place to
    what was written (the Markdown and the chart are drawn from it).
    """

    def __init__(self, path: str, results: dict):
        self.path, self.results = path, results
        self.runs: Dict[tuple, dict] = {}
        self.invocations: List[dict] = []

    def add_run(self, entry: dict):
        self.runs[(entry["method"], entry["seed"])] = entry

    def add_invocation(self, invocation: dict):
        self.invocations.append(invocation)
        self.results.setdefault("invocations", []).append(invocation)

    def write(self):
        on_disk = read_json(self.path) or {}
        merged = dict(on_disk)
        merged.update({k: v for k, v in self.results.items() if k not in ("runs", "invocations")})
        merged["runs"] = list(on_disk.get("runs", self.results.get("runs", [])))
        for entry in self.runs.values():
            store_entry(merged, entry)
        invocations = list(on_disk.get("invocations", self.results.get("invocations", [])))
        merged["invocations"] = invocations + [i for i in self.invocations if i not in invocations]
        self.results.clear()
        self.results.update(merged)
        write_json(self.path, self.results)


# ----------------------------------------------------------------------------- the study


def _sha1(path: str) -> Optional[str]:
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # checkpoints are hundreds of MB
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def teacher_changed_since_recorded(entry: dict, weights: str) -> Optional[str]:
    """
    Why the teacher weights at ``weights`` are not the ones the results' teacher row measured,
    or None. With a recorded ``weights_sha1`` the file's hash decides; an older entry without
    one is taken as changed when the file was written more than a minute after the entry's
    date (a teacher retrained on a new machine, say). Runs distilled from such weights are
    still recorded, with the teacher AP they evaluated; the report lists them.
    """
    if not os.path.isfile(weights):
        return None
    recorded = entry.get("weights_sha1")
    if recorded:
        current = _sha1(weights) or "(unreadable)"
        return None if current == recorded else f"sha1 {current[:12]} is not the recorded {recorded[:12]}"
    try:
        recorded_at = datetime.datetime.fromisoformat(entry["date"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    written = os.path.getmtime(weights)
    if written > recorded_at + 60:
        when = datetime.datetime.fromtimestamp(written, datetime.timezone.utc).isoformat(timespec="seconds")
        return f"written {when}, after the teacher row was recorded ({entry['date']})"
    return None


def bccd_image_ids(dataset: str) -> Optional[set]:
    """Image ids of a BCCD split (``bccd_train``, ``bccd_val``, ...), or None for another dataset."""
    from d2kd.data import datasets_root
    from d2kd.data.builtin import BCCD_SPLITS
    from d2kd.data.voc import read_voc_split

    split = BCCD_SPLITS.get(dataset)
    return set(read_voc_split(os.path.join(datasets_root(), "bccd"), split)) if split else None


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
    from d2kd.data import BCCD_CLASSES, datasets_root, register_voc_dataset
    from d2kd.data.voc import read_voc_split

    src = os.path.abspath(os.path.join(datasets_root(), "bccd"))
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


def _results_name(args) -> str:
    name = "bccd_accuracy" + ("_val" if args.eval_split == "val" else "") + ("_quick" if args.quick else "")
    tag = args.tag
    if not tag and os.path.normpath(args.student_config) != os.path.normpath(STUDENT_CONFIG):
        tag = os.path.splitext(os.path.basename(args.student_config))[0]  # another student: another study
    return name + (f"_{tag}" if tag else "")


def plan_jobs(
    args, methods: "OrderedDict[str, str]", split: Dict[str, str], work_root: str, results: dict
) -> List[Job]:
    """The teacher job, the baseline and the methods for every seed, with what to do for each."""
    quick = list(QUICK_INPUT_OPTS) if args.quick else []
    user = list(args.opts or [])
    teacher_config = args.teacher_config
    jobs: List[Job] = []

    # --- the teacher: trained once, or reused, or given; evaluated on the split
    teacher_cfg = load_cfg(teacher_config)
    teacher_seed = int(teacher_cfg.SEED)
    # The path the distill configs read the teacher from (the teacher config's own OUTPUT_DIR if no method).
    first = next(iter(methods.values()), None)
    configured = (
        load_cfg(first).DISTILL.TEACHER.WEIGHTS if first else os.path.join(teacher_cfg.OUTPUT_DIR, "model_final.pth")
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
    student_iters_cfg = load_cfg(args.student_config)
    runs = ([] if args.no_baseline else [("baseline", args.student_config, "baseline")]) + [
        (m, path, "distill") for m, path in methods.items()
    ]
    for method, config, kind in runs:
        cfg = load_cfg(config) if kind == "distill" else student_iters_cfg
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


def run_job(job: Job, runner):
    """
    Train (or evaluate, or just harvest) one job; thread-safe for different jobs. Returns
    ``(seconds of earlier invocations or None, seconds now)``.
    """
    timer_file = os.path.join(job.output_dir, "bench_time.json")
    previous = 0.0
    if job.action == "resume":
        previous = float((read_json(timer_file) or {}).get("seconds", 0.0))
    if job.action == "train":
        for stale in ("eval_results.json", "last_checkpoint"):
            path = os.path.join(job.output_dir, stale)
            if os.path.exists(path) and job.kind != "teacher":
                os.remove(path)
    start = time.time()
    if job.action != "harvest":
        os.makedirs(job.output_dir, exist_ok=True)
        if job.kind == "teacher_eval" and os.path.isfile(os.path.join(job.output_dir, "eval_results.json")):
            os.remove(os.path.join(job.output_dir, "eval_results.json"))
        note_run_start(job, start)
        try:
            runner.run(job, os.path.join(job.output_dir, "benchmark_stdout.log"))
        finally:
            if job.kind != "teacher_eval":
                write_json(timer_file, {"seconds": previous + time.time() - start})
    else:
        previous = (read_json(timer_file) or {}).get("seconds")  # None: not trained by this script
    return previous, time.time() - start


RUN_STARTS_FILE = "bench_job.json"


def note_run_start(job: Job, start: float):
    """
    Appends this invocation's provenance to ``<run>/bench_job.json`` before the run starts, so
    a run that finishes after its study process has gone (killed, machine restarted) and is
    harvested later is still recorded with the commit, threads and command it trained with.
    """
    path = os.path.join(job.output_dir, RUN_STARTS_FILE)
    starts = (read_json(path) or {}).get("starts", []) if job.action != "train" else []
    starts.append(
        {
            "started": start,
            "date": utc_now(),
            "action": job.action,
            "git": git_info(),
            "run_threads": job.extra.get("threads"),
            "parallel_jobs": job.extra.get("parallel_jobs"),
            "benchmark_command": job.extra.get("invocation"),
        }
    )
    write_json(path, {"starts": starts})


def run_provenance(output_dir: str) -> dict:
    """
    How a run was trained, read from its folder: from ``bench_job.json`` (the last start: its
    commit, threads, parallel jobs and command) when the study started it, and its wall time
    from file times, for a harvest whose timer was never written (the study process ended
    before the run): the first start, or else train_net's ``config.yaml``, to ``eval_results.json``.
    ``wall_time_source`` says which, and when the first recorded start is a resume (the run
    began without the file) that the earlier iterations are missing; a resumed run's file-time
    wall includes any pause.
    """
    found = {}
    starts = (read_json(os.path.join(output_dir, RUN_STARTS_FILE)) or {}).get("starts", [])
    if starts:
        last = starts[-1]
        found = {k: last.get(k) for k in ("git", "run_threads", "parallel_jobs", "benchmark_command")}
        found["trained_date"] = last.get("date")
    results = os.path.join(output_dir, "eval_results.json")
    config = os.path.join(output_dir, "config.yaml")
    if os.path.isfile(results) and (starts or os.path.isfile(config)):
        begin, source = (starts[0]["started"], RUN_STARTS_FILE) if starts else (os.path.getmtime(config), "config.yaml")
        found["wall_time_s"] = round(os.path.getmtime(results) - begin, 1)
        found["wall_time_source"] = f"file times: {source} to eval_results.json"
        if starts and starts[0].get("action") == "resume":  # started before bench_job.json existed
            found["wall_time_source"] += " (first recorded start is a resume: earlier iterations not included)"
    return found


def record_job(job: Job, results: dict, args, split: Dict[str, str], invocation: str, previous, seconds) -> dict:
    """The results entry of a finished job (stored in ``results``, replacing an older one)."""
    evaluated = read_eval_results(job.output_dir)
    entry = {
        "method": job.method,
        "seed": job.seed,
        "kind": "teacher" if job.kind == "teacher_eval" else job.kind,
        "metrics": evaluated["bbox"],
        "config": job.config,
        "config_sha1": _sha1(os.path.join(REPO_ROOT, job.config)),
        "opts": job.opts,
        "command": job.command(),
        "output_dir": job.output_dir,
        "iterations": job.iterations,
        "ims_per_batch": int(load_cfg(job.config, job.opts).SOLVER.IMS_PER_BATCH),
        "train_dataset": split["train"],
        "test_dataset": split["test"],
        "action": job.action,
        "wall_time_s": None if previous is None else round(previous + (seconds if job.action != "harvest" else 0.0), 1),
        "in_process": bool(args.in_process),
        "run_threads": job.extra.get("threads"),
        "parallel_jobs": args.jobs,
        "benchmark_command": invocation,
    }
    if job.kind == "teacher_eval":
        entry["wall_time_s"] = None  # the teacher was not trained here
        entry["eval_time_s"] = round(seconds, 1)
    if job.kind in ("teacher", "teacher_eval", "distill"):
        weights = job.extra.get("weights")
        prefix = "teacher_" if job.kind == "distill" else ""
        entry[prefix + "weights"] = weights
        entry[prefix + "weights_sha1"] = _sha1(weights) if weights else None
    if "teacher/bbox" in evaluated:
        entry["teacher_metrics"] = evaluated["teacher/bbox"]
    if job.kind == "distill":
        entry["loss_balance"] = loss_balance(job.output_dir)
    if job.kind in ("baseline", "distill"):
        entry["detector_fit"] = detector_fit(job.output_dir)
    entry.update(
        {
            k: v
            for k, v in provenance().items()
            if k in ("date", "git", "torch", "detectron2", "cpu", "cpu_count", "torch_threads")
        }
    )
    trained = run_provenance(job.output_dir)
    if job.action == "harvest":
        keep_timer = entry["wall_time_s"] is not None  # the study's own timer beats file times
        entry.update(
            {k: v for k, v in trained.items() if v is not None and not (keep_timer and k.startswith("wall_time"))}
        )
        entry["harvested_by"] = invocation
    elif trained.get("git"):  # the commit the run started from (HEAD may have moved since)
        entry["git"] = trained["git"]
    store_entry(results, entry)
    return entry


def _main(args, argv) -> int:
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.quick:
        args.in_process = True
        args.student_iters = args.student_iters or 2
        args.teacher_iters = args.teacher_iters or 1
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}.")
    if args.jobs > 1 and args.in_process:
        raise SystemExit(
            "--jobs N > 1 trains runs side by side in subprocesses; drop --in-process (and --quick, which "
            "runs in-process) or use --jobs 1."
        )
    output_dir = args.output_dir or ("output/benchmarks/quick" if args.quick else RESULTS_DIR)
    name = _results_name(args)
    args._json = json_path = os.path.join(output_dir, name + ".json")
    md_path, png_path = os.path.join(output_dir, name + ".md"), os.path.join(output_dir, name + ".png")
    results = read_json(json_path) or {}
    store = ResultsFile(json_path, results)
    backfilled = False
    for entry in results.get("runs", []):  # runs recorded before the loss balance or fit was, or by an older rule
        if entry.get("kind") in ("baseline", "distill") and _same_schedule(entry):
            found = {"detector_fit": detector_fit(entry["output_dir"])}
            if entry["kind"] == "distill":
                found["loss_balance"] = loss_balance(entry["output_dir"])
            for key, value in found.items():
                if value is not None and value != entry.get(key):
                    entry[key] = value
                    store.add_run(entry)
                    backfilled = True
        # harvested before file times were read (None), or read by an older rule: read them now
        timed_by_files = entry.get("wall_time_s") is None or str(entry.get("wall_time_source")).startswith("file times")
        if entry.get("action") == "harvest" and timed_by_files and os.path.isdir(entry["output_dir"]):
            found = run_provenance(entry["output_dir"])
            if "wall_time_s" in found and found["wall_time_source"] != entry.get("wall_time_source"):
                entry.update(wall_time_s=found["wall_time_s"], wall_time_source=found["wall_time_source"])
                store.add_run(entry)
                backfilled = True

    if args.baseline_from:
        seeds = import_baselines(results, store, args.baseline_from, args.student_config)
        print(f"Baseline seeds {seeds} copied from {args.baseline_from}" if seeds else "No baseline seed to copy.")
        warning = baselines_from_another_cpu(results, seeds, provenance()["cpu"])
        if warning and not args.report_only:
            print(warning)
        if seeds and args.report_only:  # otherwise the study records its invocation below
            store.add_invocation(_invocation(argv))
        backfilled = backfilled or bool(seeds)

    if args.report_only:
        if backfilled:
            store.write()
        write_text(md_path, render_markdown(results))
        render_chart(results, png_path)
        print(render_markdown(results))
        print(f"Wrote {md_path} and {png_path}")
        return 0

    found = discover_methods(*split_method_pattern(args.method_configs))
    available, skipped = study_methods(found, args.student_config, args.teacher_config)
    for m in args.methods or []:
        if m in skipped:
            raise SystemExit(f"Method '{m}' ({found[m]}) is not part of this study: {skipped[m]}.")
    if skipped:
        print("Not in this study (another student or teacher): " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if args.quick and not args.methods:
        args.methods = ["fitnet"] if "fitnet" in available else list(available)[:1]
    methods = OrderedDict((m, available[m]) for m in select_names(args.methods, list(available)))
    split = dict(SPLITS[args.eval_split])
    work_root = os.path.join(
        args.work_dir or (os.path.join(output_dir, "work") if args.quick else "output/benchmarks"), name
    )
    if args.quick:
        split = dict(QUICK_SPLIT)

    results.setdefault("benchmark", "bccd_accuracy")
    if results.get("test_dataset", split["test"]) != split["test"]:
        raise SystemExit(f"{json_path} holds results on {results['test_dataset']}, not {split['test']}.")
    results.update({"split": args.eval_split, "train_dataset": split["train"], "test_dataset": split["test"]})
    results.update({"student_config": args.student_config, "teacher_config": args.teacher_config})

    jobs = plan_jobs(args, methods, split, work_root, results)
    command = command_string(SCRIPT, argv)
    for job in jobs:  # what note_run_start records in each run folder
        job.extra.update(invocation=command, parallel_jobs=args.jobs)
    print(
        f"Accuracy study '{name}': train {split['train']}, evaluate {split['test']}; methods {list(methods)}; "
        f"seeds {args.seeds}; {'in-process' if args.in_process else 'subprocess'} runs under {work_root}"
    )
    for i, job in enumerate(jobs):
        threads = job.extra.get("threads")
        threads_note = f"; {threads} thread{'s' if threads != 1 else ''}" if threads else ""
        print(
            f"  {i + 1:>2}. {job.label:<24} {job.action:<8} ({job.reason}); {job.iterations} iters{threads_note}\n"
            f"      {job.command() if job.action not in ('skip', 'harvest') else ''}".rstrip()
        )
    if args.dry_run:
        return 0
    if args.quick:
        register_quick_datasets(os.path.join(work_root, "quick_data"))
    elif args.in_process:
        from d2kd import register_bccd

        register_bccd()

    store.add_invocation(_invocation(argv))
    store.write()
    runner = InProcessRunner() if args.in_process else SubprocessRunner()
    progress = Progress([0 if j.action in ("skip", "harvest") else COST[j.kind] * j.iterations for j in jobs])
    index = {id(job): i for i, job in enumerate(jobs)}
    started = {}
    teacher_keys = {job.key for job in jobs if job.kind == "teacher" and job.action != "skip"}
    for job in jobs:
        if job.action == "skip":
            print(progress.line(index[id(job)], f"{job.label}: skipped ({job.reason})"), flush=True)

    def on_start(job):
        started[id(job)] = time.time()
        print(
            progress.line(index[id(job)], f"{job.label}: {job.action} ({job.iterations} iters) -> {job.output_dir}"),
            flush=True,
        )

    def on_success(job, outcome):
        seconds = time.time() - started[id(job)]
        progress.finished(index[id(job)], seconds / max(1, args.jobs))
        if job.extra.get("keep_recorded_row"):  # weights trained again for the runs; the row stays
            ap = read_eval_results(job.output_dir)["bbox"].get("AP")
            print(
                f"    {job.label} trained again in {fmt_duration(seconds)}: AP {ap if ap is None else round(ap, 2)} "
                "(the results' teacher row is kept; each distillation run records the teacher AP it used)",
                flush=True,
            )
            return
        entry = record_job(job, results, args, split, command, *outcome)
        store.add_run(entry)
        store.write()
        write_text(md_path, render_markdown(results))
        m = entry["metrics"]
        print(
            f"    {job.label} done in {fmt_duration(seconds)}: "
            + ", ".join(f"{k} {m.get(k) if m.get(k) is None else round(m[k], 2)}" for k in METRICS),
            flush=True,
        )

    def on_failure(job, error):
        print(f"    FAILED {job.label}: {error}", flush=True)
        if job.kind == "teacher":
            print("The teacher could not be trained; the distillation runs need it.", flush=True)

    outcome = run_with_dependencies(
        [job for job in jobs if job.action != "skip"],
        lambda job: run_job(job, runner),
        max_parallel=args.jobs,
        key=lambda job: job.key,
        depends_on=lambda job: teacher_keys if job.kind == "distill" else (),
        on_start=on_start,
        on_success=on_success,
        on_failure=on_failure,
        failure_types=(RunFailed,),
    )
    failures = [job.label for job in outcome["failed"] + outcome["blocked"]]
    if outcome["blocked"]:
        print(f"Not run (their teacher failed): {[job.label for job in outcome['blocked']]}", flush=True)

    store.write()
    write_text(md_path, render_markdown(results))
    render_chart(results, png_path)
    print(render_markdown(results))
    print(f"Wrote {json_path}, {md_path}, {png_path}")
    if failures:
        print(f"{len(failures)} run(s) failed: {failures}. Re-run the same command to retry them.")
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_repo_root(_main, args, argv, ("output_dir", "work_dir", "teacher_weights"))


if __name__ == "__main__":
    sys.exit(main())
