"""
Shared fixtures: tiny CPU configs on the embedded BCCD data and teacher checkpoints.

Tests train for 2-4 iterations on small inputs; a "teacher checkpoint" is a freshly built
model saved with Detectron2's checkpointer (the plumbing under test does not depend on the
teacher being good).
"""

import importlib.util
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from d2kd.config import merge_config
from d2kd import get_distill_cfg, register_bccd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
# The study scripts of benchmarks/ and their `study` package are not part of the installed d2kd:
# tests/benchmarks imports `study` as the scripts do.
BENCHMARKS = os.path.join(REPO, "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

register_bccd(os.path.join(REPO, "datasets"))
# One intra-op thread: the test models are tiny, and several test processes (the DDP test) or
# other jobs sharing the cores make OpenMP spin-waiting very costly with more.
torch.set_num_threads(1)


def shrink_for_tests(cfg, output_dir, max_iter=2):
    """Make a BCCD config fast enough for a unit test (in place, unfrozen)."""
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    cfg.INPUT.MAX_SIZE_TRAIN = 192
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 192
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 100000
    cfg.SOLVER.BASE_LR = 0.01
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 100
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def load_test_cfg(config_path, output_dir, opts=(), max_iter=2):
    """A repository config (relative to configs/) shrunk for tests."""
    cfg = get_distill_cfg()
    merge_config(cfg, os.path.join(CONFIGS, config_path))
    shrink_for_tests(cfg, output_dir, max_iter)
    cfg.merge_from_list(list(opts))  # after shrinking, so a test's options win
    return cfg


def save_random_checkpoint(config_path, path, opts=()):
    """Build the model of ``config_path`` and save its (random) weights at ``path``."""
    cfg = load_test_cfg(config_path, os.path.dirname(path), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[: -len(".pth")])
    return path


@pytest.fixture(scope="session")
def teacher_r18_weights(tmp_path_factory):
    """Weights of an R18-FPN BCCD model, used as the teacher in most tests."""
    d = tmp_path_factory.mktemp("teacher_r18")
    return save_random_checkpoint("bccd/student_R18_FPN.yaml", str(d / "teacher.pth"))


@pytest.fixture(scope="session")
def teacher_r50_weights(tmp_path_factory):
    """Weights of the R50-FPN BCCD teacher architecture."""
    d = tmp_path_factory.mktemp("teacher_r50")
    return save_random_checkpoint("bccd/teacher_R50_FPN.yaml", str(d / "teacher.pth"))


def distill_cfg(config_path, output_dir, teacher_weights, teacher_config="bccd/student_R18_FPN.yaml", opts=(), max_iter=2):
    """A distillation config shrunk for tests, with the teacher taken from ``teacher_weights``."""
    opts = [
        "DISTILL.TEACHER.CONFIG_FILE",
        os.path.join(CONFIGS, teacher_config),
        "DISTILL.TEACHER.WEIGHTS",
        teacher_weights,
        "DISTILL.EVAL_TEACHER",
        False,
    ] + list(opts)
    cfg = load_test_cfg(config_path, output_dir, opts, max_iter)
    # The teacher must see the same small inputs.
    cfg.DISTILL.TEACHER.OPTS = [
        "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192,
    ]
    return cfg


class _FakeFPNBackbone(torch.nn.Module):
    """Reports FPN shapes p2 (stride 4) and p3 (stride 8) of ``channels`` channels; no weights."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels

    def output_shape(self):
        return {"p2": ShapeSpec(channels=self.channels, stride=4), "p3": ShapeSpec(channels=self.channels, stride=8)}


def fake_fpn_context(student_channels, teacher_channels):
    """A BuildContext of two shape-only FPN models, for building feature heads in unit tests."""
    from d2kd.heads import BuildContext

    def model(channels):
        m = torch.nn.Module()
        m.backbone = _FakeFPNBackbone(channels)
        return m

    return BuildContext(model(student_channels), model(teacher_channels), None, None)


def _load_benchmark_script(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_script():
    """Load a script of ``benchmarks/`` by its name: ``load_script("accuracy")`` is benchmarks/accuracy.py."""
    return _load_benchmark_script


@pytest.fixture
def results_dir_untouched():
    """The quick modes must never write into benchmarks/results."""
    folder = os.path.join(BENCHMARKS, "results")

    def snapshot():
        return (
            {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder)} if os.path.isdir(folder) else {}
        )

    before = snapshot()
    yield
    assert snapshot() == before, "a quick benchmark wrote into benchmarks/results"
