"""
A regular (non-editable) install of d2kd runs the BCCD quick start from another working
directory: the package carries no knowledge of the checkout, and the shipped configs name their
teacher config relative to themselves.
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
]


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """d2kd installed with pip (not editable) into a folder of its own, built from a copy of the checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "output", "datasets", "benchmarks", "*.egg-info", "build", "__pycache__"))
    target = root / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        cwd=str(root),
        env=dict(os.environ),
    )
    return target


@pytest.mark.train
def test_quick_start_from_another_directory_with_a_regular_install(installed, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(os.path.join(REPO, "train_net.py"), workdir / "train_net.py")  # a user's own copy of the script
    env = dict(os.environ, PYTHONPATH=str(installed), D2KD_DATASETS=os.path.join(REPO, "datasets"), OMP_NUM_THREADS="1")
    where = _run([sys.executable, "-c", "import d2kd; print(d2kd.__file__)"], str(workdir), env).stdout.strip()
    assert where.startswith(str(installed)), where

    configs = os.path.join(REPO, "configs", "bccd")
    # 1. the teacher; 2. the distilled student, its teacher config named relative to the preset.
    _run([sys.executable, "train_net.py", "--config-file", os.path.join(configs, "teacher_R50_FPN.yaml"),
          "OUTPUT_DIR", "out/teacher", "DATASETS.TEST", "()"] + SMALL, str(workdir), env)
    assert (workdir / "out" / "teacher" / "model_final.pth").is_file()
    _run([sys.executable, "train_net.py", "--config-file", os.path.join(configs, "distill_fitnet_R50_R18.yaml"),
          "DISTILL.TEACHER.WEIGHTS", "out/teacher/model_final.pth", "OUTPUT_DIR", "out/student", "DATASETS.TEST", "()"]
         + SMALL,
         str(workdir), env)
    assert (workdir / "out" / "student" / "model_final.pth").is_file()
    # 3. evaluation of the student checkpoint on a few test images.
    _run([sys.executable, "train_net.py", "--config-file", os.path.join(configs, "distill_fitnet_R50_R18.yaml"),
          "--eval-only", "MODEL.WEIGHTS", "out/student/model_final.pth", "DISTILL.TEACHER.WEIGHTS",
          "out/teacher/model_final.pth", "OUTPUT_DIR", "out/eval", "DATASETS.TEST", "('bccd_test',)"] + SMALL,
         str(workdir), env)
    assert (workdir / "out" / "eval" / "eval_results.json").is_file()
