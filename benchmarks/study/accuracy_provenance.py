"""
Where the accuracy study's numbers come from (``benchmarks/accuracy.py``), beyond
:func:`study.provenance`: what a run folder records of the invocation that started it
(``bench_job.json``: a run finished after its study process had gone is still recorded with the
commit, threads and command it trained with, and its wall time from file times), and whether
teacher weights are the ones a results file measured (their sha1).
"""

import datetime
import hashlib
import os
from typing import Optional

from .accuracy_jobs import Job
from .common import git_info, read_json, utc_now, write_json


def file_sha1(path: str) -> Optional[str]:
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
        current = file_sha1(weights) or "(unreadable)"
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
