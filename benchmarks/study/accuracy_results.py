"""
The accuracy study's results file (``benchmarks/accuracy.py``): one entry per (method, seed),
made from a finished run's folder (:func:`record_job`) and merged into a JSON file that two study
processes may share (:class:`ResultsFile`); baselines copied from another study
(``--baseline-from``); entries completed from their run folders (:func:`backfill_runs`).
"""

import json
import math
import os
from typing import Dict, List, Optional

from d2kd.config import load_config

from .accuracy_jobs import Job, RunFailed
from .accuracy_provenance import file_sha1, run_provenance
from .common import REPO_ROOT, provenance, read_json, write_json
from .detector_fit import detector_fit
from .loss_balance import loss_balance, read_logged_iterations


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


def _same_schedule(entry: dict) -> bool:
    """Whether the entry's output directory still holds its run: its last training record is the last iteration."""
    path = os.path.join(entry["output_dir"], "metrics.json")
    records = read_logged_iterations(path) if os.path.isfile(path) else []
    return bool(records) and int(records[-1]["iteration"]) + 1 == entry.get("iterations")


def backfill_runs(results: dict, store: "ResultsFile") -> bool:
    """
    Complete, from their run folders, the entries of ``results`` recorded before their loss
    balance or detector fit was (or by an older rule), and harvested runs whose wall time was not
    read from file times (or by an older rule); changed entries go to ``store``. Whether any changed.
    """
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
    return backfilled


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


def record_job(job: Job, results: dict, args, split: Dict[str, str], invocation: str, previous, seconds) -> dict:
    """The results entry of a finished job (stored in ``results``, replacing an older one)."""
    evaluated = read_eval_results(job.output_dir)
    entry = {
        "method": job.method,
        "seed": job.seed,
        "kind": "teacher" if job.kind == "teacher_eval" else job.kind,
        "metrics": evaluated["bbox"],
        "config": job.config,
        "config_sha1": file_sha1(os.path.join(REPO_ROOT, job.config)),
        "opts": job.opts,
        "command": job.command(),
        "output_dir": job.output_dir,
        "iterations": job.iterations,
        "ims_per_batch": int(load_config(job.config, job.opts).SOLVER.IMS_PER_BATCH),
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
        entry[prefix + "weights_sha1"] = file_sha1(weights) if weights else None
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
