"""
Pieces shared by the benchmark scripts (``benchmarks/accuracy.py``, ``overhead.py``, ``speed.py``, ...).

Every number the README quotes comes from these scripts, so each result file records how it
was made: the benchmark command, the date, the git commit (and whether the tree was dirty),
the library versions, the device and thread count. Methods are discovered from the config
files (``configs/bccd/distill_<method>_R50_R18.yaml``) at run time, never listed by hand.
"""

import contextlib
import datetime
import glob
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

from d2kd.config import load_config, uses_teacher
from d2kd.engine.checkpoint import atomic_write_bytes

__all__ = [
    "mean_std",
    "fmt_mean_std",
    "run_from_repo_root",
    "REPO_ROOT",
    "BCCD_CONFIG_DIR",
    "METHOD_CONFIG_PATTERN",
    "STUDENT_CONFIG",
    "TEACHER_CONFIG",
    "QUICK_INPUT_OPTS",
    "discover_methods",
    "split_method_pattern",
    "study_methods",
    "select_names",
    "repo_path",
    "performance_env",
    "in_repo_root",
    "datasets_dir",
    "torch_threads",
    "merge_opts",
    "git_info",
    "RESULTS_DIR",
    "utc_now",
    "provenance",
    "command_string",
    "write_json",
    "read_json",
    "write_text",
    "sanitize",
    "markdown_table",
    "fmt_duration",
    "Progress",
    "median",
    "percentile",
    "safe_name",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BCCD_CONFIG_DIR = "configs/bccd"
METHOD_CONFIG_PATTERN = "distill_{method}_R50_R18.yaml"
STUDENT_CONFIG = "configs/bccd/student_R18_FPN.yaml"
TEACHER_CONFIG = "configs/bccd/teacher_R50_FPN.yaml"

# --quick: inputs and sampling sizes small enough for a unit test (the values of
# tests/conftest.py's shrink_for_tests), given as config overrides so they appear in commands.
QUICK_INPUT_OPTS = [
    "INPUT.MIN_SIZE_TRAIN",
    "(128,)",
    "INPUT.MAX_SIZE_TRAIN",
    "192",
    "INPUT.MIN_SIZE_TEST",
    "128",
    "INPUT.MAX_SIZE_TEST",
    "192",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
    "SOLVER.CHECKPOINT_PERIOD",
    "100000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
    "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "200",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def discover_methods(
    config_dir: str = BCCD_CONFIG_DIR, pattern: str = METHOD_CONFIG_PATTERN
) -> "OrderedDict[str, str]":
    """
    ``{method: config path}`` for every file matching ``pattern`` in ``config_dir``
    (relative paths are taken from the repository root), sorted by method name.
    """
    root = config_dir if os.path.isabs(config_dir) else os.path.join(REPO_ROOT, config_dir)
    prefix, suffix = pattern.split("{method}")
    found = {}
    for path in glob.glob(os.path.join(root, prefix + "*" + suffix)):
        name = os.path.basename(path)[len(prefix) : len(os.path.basename(path)) - len(suffix)]
        if name:
            found[name] = os.path.join(config_dir, os.path.basename(path))
    return OrderedDict(sorted(found.items()))


def split_method_pattern(pattern: str):
    """``"configs/bccd/distill_{method}_R50_R18.yaml"`` -> (folder, file pattern)."""
    if "{method}" not in os.path.basename(pattern):
        raise SystemExit(f"A method config pattern needs '{{method}}' in its file name, got {pattern!r}.")
    return os.path.dirname(pattern) or ".", os.path.basename(pattern)


def repo_path(path: str) -> str:
    """
    A config path as the study names it: relative to the repository root when it lies inside
    (a relative ``path`` is taken from the root, as the study's configs are; the config loader
    makes the paths a YAML file names absolute), else ``path`` unchanged.
    """
    absolute = os.path.normpath(path if os.path.isabs(path) else os.path.join(REPO_ROOT, path))
    relative = os.path.relpath(absolute, REPO_ROOT)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _student_signature(cfg):
    m = cfg.MODEL
    return (m.META_ARCHITECTURE, m.BACKBONE.NAME, m.RESNETS.DEPTH, m.FPN.OUT_CHANNELS, tuple(cfg.INPUT.MIN_SIZE_TRAIN))


def study_methods(methods: Dict[str, str], student_config: str, teacher_config: str):
    """
    Split discovered methods into those that distil ``teacher_config`` into the student of
    ``student_config`` (same meta-architecture, backbone, depth, FPN width, input size) and
    the others, with the reason: ``(kept, {method: reason})``. A RetinaNet preset, say, does
    not belong in the Faster R-CNN table (its baseline and teacher differ).
    """
    base = _student_signature(load_config(student_config))
    kept, skipped = OrderedDict(), OrderedDict()
    for name, path in methods.items():
        cfg = load_config(path)
        if not uses_teacher(cfg):
            skipped[name] = "no DISTILL.HEADS, no DISTILL.INHERIT"
        elif repo_path(cfg.DISTILL.TEACHER.CONFIG_FILE) != repo_path(teacher_config):
            skipped[name] = f"teacher {repo_path(cfg.DISTILL.TEACHER.CONFIG_FILE)}, not {teacher_config}"
        elif _student_signature(cfg) != base:
            skipped[name] = f"student {_student_signature(cfg)[:3]} differs from {student_config} {base[:3]}"
        else:
            kept[name] = path
    return kept, skipped


def select_names(requested: Optional[Sequence[str]], available: Sequence[str], what: str = "method") -> List[str]:
    """``requested`` (all of ``available`` if None), checked against ``available``."""
    if not requested:
        return list(available)
    unknown = [r for r in requested if r not in available]
    if unknown:
        raise SystemExit(
            f"Unknown {what}(s) {unknown}. Available {what}s (discovered from the config files "
            f"{BCCD_CONFIG_DIR}/{METHOD_CONFIG_PATTERN.format(method='<method>')}): {list(available)}."
        )
    return list(dict.fromkeys(requested))


@contextlib.contextmanager
def in_repo_root():
    """Run with the repository root as working directory (configs use relative paths)."""
    previous = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        yield REPO_ROOT
    finally:
        os.chdir(previous)


def datasets_dir() -> str:
    """The folder holding ``bccd/``: ``$D2KD_DATASETS``, else ``./datasets``, else the repository's copy."""
    from d2kd.data import datasets_root

    return datasets_root(default=os.path.join(REPO_ROOT, "datasets"))


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """
    Run with ``n`` intra-op threads (unchanged if None), restoring the previous count.
    On a busy machine one thread per process is far faster than several: OpenMP threads that
    wait for a descheduled sibling spin, and a 2-thread forward can be 10x slower.
    """
    import torch

    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def merge_opts(*opt_lists: Sequence) -> List[str]:
    """Concatenate KEY VALUE override lists; a key given again keeps its last value, in first position."""
    merged: "OrderedDict[str, str]" = OrderedDict()
    for opts in opt_lists:
        opts = list(opts or [])
        if len(opts) % 2:
            raise ValueError(f"Config overrides must be KEY VALUE pairs, got an odd list: {opts}")
        for key, value in zip(opts[0::2], opts[1::2]):
            merged[str(key)] = str(value) if not isinstance(value, str) else value
    return [x for kv in merged.items() for x in kv]


def _git(*args) -> Optional[str]:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# Where the benchmark scripts write their JSON, Markdown and charts (tracked in the repo).
RESULTS_DIR = "benchmarks/results"


def utc_now() -> str:
    """The date and time now, ISO 8601 in UTC to the second (the ``date`` of every result)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_info() -> Dict:
    """
    The commit of the working tree and whether tracked files differ from it. Changes under
    ``benchmarks/results/`` do not count: the benchmarks write there while they run, so
    counting them would mark every result after the first as made from a dirty tree.
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS_DIR}")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(device: Optional[str] = None) -> Dict:
    """Date, commit, versions, machine: what a reader needs to judge a number."""
    import torch

    try:
        import detectron2

        d2_version = detectron2.__version__
    except Exception:  # pragma: no cover
        d2_version = None
    info = {
        "date": utc_now(),
        "git": git_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": d2_version,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        info["device"] = str(device)
        if str(device).startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Environment variables that change speed (threads, glibc's allocator): part of a benchmark's command.
PERFORMANCE_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
PERFORMANCE_ENV_PREFIXES = ("MALLOC_",)


def performance_env() -> Dict[str, str]:
    """The speed-relevant environment variables set in this process, sorted by name."""
    return {
        k: os.environ[k]
        for k in sorted(os.environ)
        if k in PERFORMANCE_ENV or k.startswith(PERFORMANCE_ENV_PREFIXES)
    }


def command_string(script: str, argv: Optional[Sequence[str]]) -> str:
    """The shell command that reproduces this invocation, with the speed-relevant environment."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = [f"{k}={shlex.quote(v)}" for k, v in performance_env().items()]
    return " ".join(env + [shlex.join(["python", script] + [str(a) for a in argv])])


def sanitize(obj):
    """JSON-safe copy: NaN/inf become None (strict JSON), tuples lists, numbers plain."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float) or hasattr(obj, "__float__"):
        value = float(obj)
        return value if math.isfinite(value) else None
    return str(obj)


def write_text(path: str, text: str):
    """Write ``text`` to ``path`` atomically (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, lambda f: f.write(text), mode="w")


def write_json(path: str, obj):
    write_text(path, json.dumps(sanitize(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def mean_std(values: Sequence[Optional[float]]):
    """Mean and sample standard deviation (ddof 1) of the values that are not None; ``(None, None)``
    without any, std None with one."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(mean: Optional[float], std: Optional[float] = None, signed: bool = False, digits: int = 1) -> str:
    """``mean ± std`` for a report cell (``+`` sign when ``signed``); a dash without a mean."""
    if mean is None:
        return "–"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one of l/r/c per column (default l then r)."""
    header = [str(h) for h in header]
    align = align or ("l" + "r" * (len(header) - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def fmt_duration(seconds: Optional[float]) -> str:
    """``1:02:03`` style; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """
    Progress over a list of jobs of unequal size ("units", e.g. training iterations weighted
    by model cost): ``i/N``, elapsed time, and an ETA from the measured seconds per unit.
    """

    def __init__(self, units: Sequence[float]):
        self.units = list(units)
        self.start_time = time.time()
        self.done_units = 0.0
        self.done_seconds = 0.0

    def finished(self, index: int, seconds: float):
        """Job ``index`` (0-based) took ``seconds`` (only jobs that did work count)."""
        self.done_units += self.units[index]
        self.done_seconds += seconds

    def eta(self, next_index: int) -> Optional[float]:
        if self.done_units <= 0:
            return None
        remaining = sum(self.units[next_index:])
        return remaining * self.done_seconds / self.done_units

    def line(self, index: int, label: str) -> str:
        elapsed = time.time() - self.start_time
        eta = fmt_duration(self.eta(index))
        return f"[{index + 1}/{len(self.units)}] {label} | elapsed {fmt_duration(elapsed)}, ETA {eta}"


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of a non-empty sequence."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def run_from_repo_root(main_fn, args, argv, path_attrs):
    """
    The shared entry of the benchmark scripts: make the path options in ``path_attrs``
    absolute (they are relative to the caller's directory; "auto"/"random" are kept), use one
    thread in ``--quick`` mode unless ``--threads`` says otherwise, then run
    ``main_fn(args, argv)`` from the repository root (configs are relative to it).
    """
    for attr in path_attrs:
        value = getattr(args, attr, None)
        if value and value not in ("auto", "random"):
            setattr(args, attr, os.path.abspath(value))
    if args.quick and not args.threads:
        args.threads = 1
    with in_repo_root(), torch_threads(args.threads):
        return main_fn(args, argv)
