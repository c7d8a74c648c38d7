"""
How the accuracy study runs ``train_net.py`` (``benchmarks/accuracy.py``): a subprocess per run
(:class:`SubprocessRunner`, the default: its output in a log file, its progress every few
minutes) or a call in this process (:class:`InProcessRunner`: ``--quick`` and the tests), and
:func:`run_job`, which times a run and records its start in its folder.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from typing import Optional

from .accuracy_jobs import Job, RunFailed
from .accuracy_provenance import note_run_start
from .common import REPO_ROOT, fmt_duration, read_json, write_json


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
