"""
Shared fixtures and helpers of the tests: tiny CPU configs on the embedded BCCD data and teacher
checkpoints, short training runs, train_net's command line, toy VOC datasets, the shape-only
models, hand-made records and numpy references of the heads' unit tests, and log capture.

Tests train for 2-4 iterations on small inputs; a "teacher checkpoint" is a freshly built
model saved with Detectron2's checkpointer (the plumbing under test does not depend on the
teacher being good).

Two tiers (``make test`` runs every test, ``make test-fast`` runs ``pytest -m "not train"``):

- A test that trains a detector carries the ``train`` marker (``@pytest.mark.train``, or
  ``pytestmark = pytest.mark.train`` for a file of training tests); every other test is in the
  fast tier. "Trains" means any of: calls a Detectron2 trainer's ``train()`` or ``run_step()``
  (``DistillTrainer``/``DefaultTrainer``, so also ``train_net.main`` of a training run); runs a
  backward pass through more than ``DETECTOR_PARAMETERS`` parameters (a detector's training step,
  also outside a trainer: benchmarks/, tools/gpu_check.py, ``--check``, a test's own step); starts
  worker processes with ``torch.multiprocessing`` (DDP, ``launch`` with more than one process);
  runs a Python script file in a subprocess (``train_net.py``, ``tools/demo.py``, DDP workers;
  ``python -c`` and ``python -m`` are not refused).
- The marker is enforced, so a new test lands in the right tier without anyone remembering it:
  in a test without it, each of these calls fails with "this test trains a detector: mark it
  @pytest.mark.train" (:func:`pytest_runtest_protocol`, for the test's fixtures too). Unknown
  markers are errors (``--strict-markers`` in setup.cfg).
- ``make test-fast`` runs on one pytest-xdist worker per core, a test file per worker
  (``--dist loadfile``); every test starts from seeded global generators (random, numpy, torch),
  so it gives the same result alone, in either tier and on any worker.

Logs: use the :func:`d2kd_logs` fixture (in a module- or session-scoped fixture, where ``caplog``
cannot go: :func:`log_messages`), never ``logger.addHandler(caplog.handler)``. train_net
(Detectron2's ``setup_logger(name="d2kd")``) stops the "d2kd" logger propagating to the root,
where older pytest listens, while pytest 9.2+ also attaches its handler to non-propagating
loggers: a hand-added handler then sees every record twice.
"""

import contextlib
import importlib.util
import logging
import math
import os
import random
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import TrainerBase
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from d2kd.config import merge_config
from d2kd import DistillTrainer, get_distill_cfg, register_bccd
from d2kd.capture import Records
from d2kd.heads import BuildContext, StepInputs, build_distill_heads
from d2kd.modeling.distiller import DistillationModel
from d2kd.modeling.schedule import DistillSchedule
from d2kd.modeling.teacher import build_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
FITNET = "bccd/distill_fitnet_R50_R18.yaml"
sys.path.insert(0, REPO)  # train_net.py, the command-line entry point, is at the repository root
import train_net  # noqa: E402
# The study scripts of benchmarks/ and their `study` package are not part of the installed d2kd:
# tests/benchmarks imports `study` as the scripts do.
BENCHMARKS = os.path.join(REPO, "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

register_bccd(os.path.join(REPO, "datasets"))
# One intra-op thread: the test models are tiny, and several test processes (the DDP test) or
# other jobs sharing the cores make OpenMP spin-waiting very costly with more.
torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# The two tiers: a test without the ``train`` marker may not train (see the module docstring)
# ---------------------------------------------------------------------------------------


TRAIN_MARKER = "train"
# A backward pass through more parameters is a detector's training step (the R18-FPN student:
# about 15 million); the toy modules of unit tests have a few hundred at most.
DETECTOR_PARAMETERS = 1_000_000


def _refuse(what):
    pytest.fail(
        f"this test trains a detector: mark it @pytest.mark.{TRAIN_MARKER} ({what}; "
        "tests/conftest.py explains the two tiers)",
        pytrace=True,
    )


def _trainer_classes(cls=TrainerBase):
    yield cls
    for sub in cls.__subclasses__():
        yield from _trainer_classes(sub)


def _python_script(args):
    """The script file a ``python script.py ...`` command runs, else None (``-c``, ``-m`` or not Python)."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    argv = [os.fsdecode(a) for a in argv]
    if len(argv) == 1:
        argv = argv[0].split()
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python") and argv[0] != sys.executable:
        return None
    return argv[1] if argv[1].endswith(".py") else None


class _NoTrainingPopen(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        script = _python_script(args)
        if script is not None:
            _refuse(f"it runs the script {os.path.basename(script)} in a subprocess")
        super().__init__(args, *rest, **kwargs)


def _backward_parameters(tensors):
    """How many parameter values a backward pass from ``tensors`` reaches (the autograd graph's leaves)."""
    tensors = [tensors] if torch.is_tensor(tensors) else list(tensors)
    seen, stack, size = set(), [t.grad_fn for t in tensors if t.grad_fn is not None], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: a parameter
        size += leaf.numel() if leaf is not None else 0
        stack.extend(next_node for next_node, _ in node.next_functions)
    return size


def _no_detector_backward(backward):
    def guarded(tensors, *args, **kwargs):
        size = _backward_parameters(tensors)
        if size > DETECTOR_PARAMETERS:
            _refuse(f"it runs a backward pass through {size} parameters")
        return backward(tensors, *args, **kwargs)

    return guarded


def _forbid_training(patch):
    """Make every way a test trains (module docstring) fail until ``patch`` (a MonkeyPatch) is undone."""
    for cls in set(_trainer_classes()):
        for name in ("train", "run_step"):
            if name in vars(cls):
                patch.setattr(cls, name, lambda *a, _what=f"{cls.__name__}.{name}()", **k: _refuse(f"it calls {_what}"))
    patch.setattr(torch.autograd, "backward", _no_detector_backward(torch.autograd.backward))

    def start_processes(*args, **kwargs):
        _refuse("it starts worker processes with torch.multiprocessing")

    patch.setattr(importlib.import_module("torch.multiprocessing.spawn"), "start_processes", start_processes)
    patch.setattr(torch.multiprocessing, "start_processes", start_processes)
    patch.setattr(subprocess, "Popen", _NoTrainingPopen)


TEACHER_CHECKPOINT_SEED = 1


def _seed_global_generators(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test starts from seeded global generators, so its outcome does not depend on which tests
    ran before it (alone, in ``make test``, or on a worker of ``make test-fast``); a test without the
    ``train`` marker runs with training forbidden. Both cover the module- and session-scoped
    fixtures its setup creates."""
    _seed_global_generators()
    if item.get_closest_marker(TRAIN_MARKER) is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        _forbid_training(patch)
        yield


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------


@pytest.fixture
def d2kd_logs(caplog):
    """``d2kd_logs(logger="d2kd", level=logging.INFO)``: ``caplog``, seeing that logger's records of
    ``level`` and above until the test ends, under every pytest the project admits.

    The logger and its parents propagate to the root for the test (train_net's
    ``setup_logger(name="d2kd")`` turns propagation off), where pytest's handlers listen, and no
    handler is added. pytest 9.2+ also attaches its handlers to the loggers that do not propagate
    when a test phase begins; such a logger now propagates to the root, so the root's handlers are
    taken off it: pytest sees each record once, whenever ``d2kd_logs`` is called. A test that
    itself runs ``setup_logger(name="d2kd")`` (``train_net.main``) calls ``d2kd_logs`` after it.
    """
    saved = {}

    def capture(logger="d2kd", level=logging.INFO):
        node = logging.getLogger(logger)
        while isinstance(node, logging.Logger) and node is not logging.root:
            saved.setdefault(node, node.propagate)
            node.propagate = True
            for handler in [h for h in node.handlers if h in logging.root.handlers]:
                node.removeHandler(handler)
            node = node.parent
        caplog.set_level(level, logger=logger)  # restored by caplog at the end of the test
        return caplog

    yield capture
    for node, propagate in saved.items():
        node.propagate = propagate


@contextlib.contextmanager
def log_messages(logger, level=logging.INFO):
    """The messages ``logger`` emits inside the ``with`` block, as a list: only for module- or
    session-scoped fixtures, where the function-scoped ``caplog`` (:func:`d2kd_logs`) cannot go.
    Its own list handler, which pytest never attaches: no record is seen twice."""
    messages = []

    class _ListHandler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _ListHandler(level)
    node = logging.getLogger(logger)
    old_level = node.level
    node.addHandler(handler)
    node.setLevel(level)
    try:
        yield messages
    finally:
        node.removeHandler(handler)
        node.setLevel(old_level)


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
    # Not the tests' seed (_seed_global_generators): a student built at that seed must differ from
    # the teacher, or feature-imitation terms start at exactly zero.
    torch.manual_seed(TEACHER_CHECKPOINT_SEED)
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


# ---------------------------------------------------------------------------------------
# Short training runs and single steps of real (tiny) detectors
# ---------------------------------------------------------------------------------------


RETINA_STUDENT = "bccd/retinanet_R18_FPN_student.yaml"
RETINA_LEVELS = ["p3", "p4", "p5", "p6", "p7"]
IMAGENET_RGB = ["MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53], "MODEL.PIXEL_STD", [58.395, 57.12, 57.375], "INPUT.FORMAT", "RGB"]


@pytest.fixture(scope="module")
def retina_r18_weights(tmp_path_factory):
    """Weights of the RetinaNet R18-FPN BCCD model, the RetinaNet teacher of these tests."""
    d = tmp_path_factory.mktemp("retina_r18")
    return save_random_checkpoint(RETINA_STUDENT, str(d / "teacher.pth"))


@pytest.fixture(scope="module")
def retina_pair(tmp_path_factory, retina_r18_weights):
    """A RetinaNet student and teacher config (for build-time checks and single forwards)."""
    d = tmp_path_factory.mktemp("retina_pair")
    return distill_cfg(
        "bccd/distill_fitnet_retinanet_R50_R18.yaml", d, retina_r18_weights, teacher_config=RETINA_STUDENT
    )


@pytest.fixture(scope="module")
def retina_models(retina_pair):
    """A RetinaNet student and teacher built from ``retina_pair`` (random weights)."""
    torch.manual_seed(0)
    return build_model(retina_pair), build_teacher(retina_pair).model


def heads_cfg(base, heads, opts=()):
    """A copy of ``base`` with ``DISTILL.HEADS = heads`` and ``opts`` merged."""
    cfg = base.clone()
    cfg.defrost()
    cfg.DISTILL.HEADS = list(heads)
    cfg.merge_from_list(list(opts))
    return cfg


def train(cfg, resume=False):
    """Build a DistillTrainer, load or resume, train; the trainer."""
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def latest_losses(trainer):
    """The last logged value of every ``loss*`` term."""
    return {k: h.latest() for k, h in trainer.storage.histories().items() if k.startswith("loss")}


def assert_logged_and_finite(trainer, keys):
    """Every term of ``keys`` was logged and is finite; the latest losses."""
    losses = latest_losses(trainer)
    missing = [k for k in keys if k not in losses]
    assert not missing, f"not logged: {missing}; logged: {sorted(losses)}"
    bad = {k: losses[k] for k in keys if not math.isfinite(losses[k])}
    assert not bad, f"non-finite: {bad}"
    return losses


def build_distiller(cfg):
    """Student, teacher, heads and the DistillationModel of ``cfg`` without a trainer or data loader."""
    torch.manual_seed(0)
    student = build_model(cfg)
    teacher, teacher_cfg = build_teacher(cfg)
    heads = build_distill_heads(cfg, BuildContext(student, teacher, cfg, teacher_cfg))
    return DistillationModel(student, teacher, heads, DistillSchedule.from_config(cfg), cfg.DISTILL.TEACHER.INPUT_SCALE)


def synthetic_batch(sizes=((128, 160), (128, 176)), empty=(1,)):
    """Images with a few boxes; the images whose index is in ``empty`` have no ground truth."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for i, (h, w) in enumerate(sizes):
        instances = Instances((h, w))
        boxes = [] if i in empty else [[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 90.0, 44.0], [30.0, 80.0, 120.0, 125.0]]
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor([0, 2, 1][: len(boxes)], dtype=torch.int64)
        image = torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def head_step_terms(student, teacher, head):
    """The ``loss_kd_*`` terms of one training step of ``head`` alone on ``synthetic_batch(empty=())``
    (the samplers and random masks draw from the global generator, seeded here)."""
    model = DistillationModel(student, teacher, torch.nn.ModuleDict({head.name: head}), DistillSchedule())
    model.train()
    torch.manual_seed(123)
    try:
        with EventStorage(0):
            losses = model(synthetic_batch(empty=()))
    finally:
        model.student_recorder.remove()
        model.teacher_recorder.remove()
    return {k: v.detach() for k, v in losses.items() if k.startswith("loss_kd_")}


def step(model, batch):
    """One training forward of a DistillationModel (losses dict)."""
    model.train()
    with EventStorage(0):
        return model(batch)


def smaller(cfg):
    """Inputs of 96 x <=128 px for student and teacher (the tests here only need plumbing)."""
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.DISTILL.TEACHER.OPTS = ["INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128,
                                "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 100]
    return cfg


# ---------------------------------------------------------------------------------------
# train_net's command line
# ---------------------------------------------------------------------------------------


def cli_args(config, output_dir, teacher_weights, extra_opts=(), **flags):
    """train_net's argument namespace for a tiny BCCD run (the test sizes of conftest)."""
    opts = [
        "OUTPUT_DIR", str(output_dir),
        "DISTILL.TEACHER.CONFIG_FILE", os.path.join(CONFIGS, "bccd/student_R18_FPN.yaml"),
        "DISTILL.TEACHER.WEIGHTS", str(teacher_weights),
        "DISTILL.TEACHER.OPTS", "['INPUT.MIN_SIZE_TEST', 128, 'INPUT.MAX_SIZE_TEST', 192, "
        "'MODEL.RPN.PRE_NMS_TOPK_TEST', 200, 'MODEL.RPN.POST_NMS_TOPK_TEST', 100]",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "DISTILL.EVAL_TEACHER", "False",
    ] + [str(x) for x in extra_opts]
    argv = ["--config-file", os.path.join(CONFIGS, config)]
    for flag, value in flags.items():
        flag = "--" + flag.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return train_net.build_parser().parse_args(argv + opts)


# ---------------------------------------------------------------------------------------
# Toy VOC datasets
# ---------------------------------------------------------------------------------------


VOC_CLASSES = ("cat", "dog")


def jpeg_bytes(width=64, height=48, seed=0) -> bytes:
    """A random JPEG image, encoded."""
    rng = np.random.RandomState(seed)
    image = rng.randint(0, 255, size=(height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    return buf.tobytes()


def voc_xml(width=64, height=48, objects=(("cat", (11, 6, 40, 30), 0),), size=True) -> str:
    """A VOC annotation file: ``objects`` are (name, (xmin, ymin, xmax, ymax), difficult)."""
    objs = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, difficult in objects
    )
    size_xml = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>x.jpg</filename>{size_xml}{objs}</annotation>"


def make_voc(root, images, split="train"):
    """A VOC folder: ``images`` maps id -> (jpeg bytes or None for no file, xml text or None)."""
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, (jpg, xml) in images.items():
        if jpg is not None:
            with open(os.path.join(root, "JPEGImages", image_id + ".jpg"), "wb") as f:
                f.write(jpg)
        if xml is not None:
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(xml)
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
        f.write("".join(i + "\n" for i in images))
    return str(root)


def tiny_train_cfg(tmp_path, dataset, opts=()):
    """The R18 student on ``dataset``, one image per batch of 48-64 px."""
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", tmp_path / "out", opts=list(opts))
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    return cfg


# ---------------------------------------------------------------------------------------
# Head unit tests: shape-only two-stage models, hand-made records and step inputs
# ---------------------------------------------------------------------------------------


class _FakeLevels(nn.Module):
    """Reports one ``p<log2 stride>`` level per stride; no weights."""
    def __init__(self, channels, strides):
        super().__init__()
        self.shapes = {f"p{int(math.log2(s))}": ShapeSpec(channels=channels, stride=s) for s in strides}

    def output_shape(self):
        return self.shapes


class FakeRCNN(nn.Module):
    """Shapes of a GeneralizedRCNN: backbone levels, an RPN anchor generator, a box predictor."""

    def __init__(self, channels=2, strides=(4, 8), anchor_features=("p2", "p3"), num_classes=2):
        super().__init__()
        self.backbone = _FakeLevels(channels, strides)
        self.proposal_generator = nn.Module()
        self.proposal_generator.anchor_generator = nn.Module()
        self.proposal_generator.in_features = list(anchor_features)
        self.roi_heads = nn.Module()
        self.roi_heads.box_predictor = nn.Module()
        self.roi_heads.num_classes = num_classes


def fake_rcnn_context(student=None, teacher=None):
    """A BuildContext of two shape-only two-stage models (FakeRCNN by default)."""
    return BuildContext(student or FakeRCNN(), teacher or FakeRCNN(), None, None)


def gt_instances(boxes, hw=(32, 32)):
    """Ground-truth Instances of class 0 with the XYXY ``boxes``."""
    inst = Instances(hw)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
    return inst


def gt_step(instances, iteration=0, image_sizes=None, padded=(32, 32)):
    """StepInputs of ground-truth ``instances`` on zero images padded to ``padded``."""
    sizes = image_sizes or [padded] * len(instances)
    images = ImageList(torch.zeros(len(instances), 3, *padded), sizes)
    return StepInputs([], instances, images, None, iteration)


def empty_step(num_images=2):
    """StepInputs of ``num_images`` images without boxes."""
    empty = Instances((16, 16), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    return StepInputs([{}] * num_images, [empty] * num_images, None, None, 0)


def backbone_records(features, **extra):
    """Records of ``backbone`` outputs ``features``; ``extra`` modules with ``__`` for ``.``."""
    data = {"backbone": [((), features)]}
    data.update({k.replace("__", "."): [((), v)] for k, v in extra.items()})
    return Records(data)


def random_features(gen, channels, batch=2, sizes=(("p2", 4), ("p3", 2))):
    """Random square maps per level: ``sizes`` are (name, side)."""
    return {k: torch.randn(batch, channels, n, n, generator=gen, dtype=torch.float64).float() for k, n in sizes}


# ---------------------------------------------------------------------------------------
# Head unit tests: numpy references
# ---------------------------------------------------------------------------------------


def np64(t):
    """A tensor as a float64 numpy array."""
    return t.detach().double().numpy()


def np_softmax(z, axis):
    """Softmax along ``axis``, in numpy."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_softmax_1d(z):
    """Softmax of a vector, in numpy."""
    e = np.exp(z - z.max())
    return e / e.sum()


def np_conv1x1(x, w, b=None):
    """A 1x1 convolution of (B, C, H, W) ``x`` with torch's (O, C, 1, 1) weight, in numpy."""
    out = np.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)
    return out if b is None else out + b[None, :, None, None]


def np_imitation_loss(s, t, w, distance="l2", channel_mean=True, normalizer="weight_sum", half=True):
    """Direct loops over (b, c, h, w): sum w d / (2 C sum w)."""
    b, c, h, wd = s.shape
    total = 0.0
    for i in range(b):
        for k in range(c):
            for y in range(h):
                for x in range(wd):
                    diff = s[i, k, y, x] - t[i, k, y, x]
                    d = diff * diff if distance == "l2" else abs(diff)
                    total += w[i, y, x] * d
    z = w.sum() if normalizer == "weight_sum" else b * h * wd
    return (0.5 if half else 1.0) * total / ((c if channel_mean else 1) * z)
