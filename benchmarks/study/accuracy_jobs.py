"""
The accuracy study's runs (``benchmarks/accuracy.py``): the data splits, one run of the study
(:class:`Job`: the teacher, the baseline or a method at one seed, and what to do with it) and the
error a failed run raises.
"""

from dataclasses import dataclass, field
from typing import Dict, List


SPLITS = {
    "test": {"train": "bccd_trainval", "test": "bccd_test"},
    "val": {"train": "bccd_train", "test": "bccd_val"},
}
QUICK_SPLIT = {"train": "bccd_quick_train", "test": "bccd_quick_test"}
QUICK_IMAGES = {"train": ("train", 4), "test": ("test", 2)}
# Relative cost of one iteration, only for the ETA (R50 step vs R18 step vs distillation step).
COST = {"teacher": 2.5, "baseline": 1.0, "distill": 1.8, "teacher_eval": 0.0}


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
