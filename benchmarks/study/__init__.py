"""
The study code shared by the benchmark scripts in ``benchmarks/`` (``accuracy.py``,
``overhead.py``, ``speed.py``, ...): method discovery from the config files, provenance
(command, date, commit, versions), atomic JSON/Markdown output, progress/ETA, and the accuracy
study's report (``accuracy_report``), all exported here. The accuracy study's plan, runners,
results file and provenance (``accuracy_plan``, ``accuracy_runners``, ``accuracy_results``,
``accuracy_provenance``, ``accuracy_jobs``) and the overhead benchmark's steps and memory probe
(``overhead_steps``, ``memory``) are imported from their modules. Not part of the installed
``d2kd`` package: the scripts put their own folder on ``sys.path`` and import ``study``.
"""

from .common import *  # noqa: F401,F403
from .common import __all__  # noqa: F401
from .accuracy_report import (  # noqa: F401
    METRICS,
    other_cpu_runs,
    other_teacher_runs,
    render_chart,
    render_markdown,
    summarize,
)
from .balanced import balanced_lines  # noqa: F401
from .detector_fit import detector_fit, detector_fit_lines  # noqa: F401
from .per_class import per_class_keys, per_class_lines  # noqa: F401
from .loss_balance import loss_balance, read_logged_iterations  # noqa: F401
from .scheduler import run_with_dependencies  # noqa: F401
