"""
Every head under mixed precision: on fixed inputs, its terms under bf16 autocast stay close to
fp32; an adapter, a non-local block and a GcBlock accept bf16 features.
"""

import copy
import glob
import math
import os
import sys

import pytest
import torch
from detectron2.utils.events import EventStorage

from d2kd.capture import Records
from d2kd.modeling.adapters import FeatureAdapter

from conftest import CONFIGS, build_distiller, distill_cfg, save_random_checkpoint, smaller, synthetic_batch

# Relative tolerance of a head's term under bf16 autocast against fp32 (see the test's docstring).
REL_TOL = 5e-2
ABS_TOL = 1e-4


def bccd_presets():
    """The BCCD presets (two-stage ``distill_*_R50_R18`` and ``*_retinanet_*``): together, every head."""
    paths = glob.glob(os.path.join(CONFIGS, "bccd", "distill_*_R50_R18.yaml"))
    paths += glob.glob(os.path.join(CONFIGS, "bccd", "*_retinanet_*.yaml"))
    return sorted({os.path.relpath(p, CONFIGS) for p in paths})


@pytest.fixture(scope="module")
def precision_teachers(tmp_path_factory):
    """The presets' own R50-FPN teacher architectures (random weights): a teacher of the student's
    architecture would get the student's very weights (both seeded 0), and zero terms."""
    d = tmp_path_factory.mktemp("precision_teachers")
    rcnn, retina = "bccd/teacher_R50_FPN.yaml", "bccd/retinanet_R50_FPN_teacher.yaml"
    return {
        "rcnn": (rcnn, save_random_checkpoint(rcnn, str(d / "rcnn.pth"))),
        "retinanet": (retina, save_random_checkpoint(retina, str(d / "retina.pth"))),
    }


def _fill_gkd_prototypes(head):
    """Random prototypes for every class and level (the trainer's PrototypeHook makes real ones)."""
    g = torch.Generator().manual_seed(1)
    for buffer in head.prototype_buffers():
        buffer.copy_(torch.randn(buffer.shape, generator=g))
    head.prototype_valid.fill_(1)
    head.prototype_iter.fill_(0)


def _to_bf16(obj):
    """Plain tensors (in dicts, lists, tuples) rounded to bf16, as a module's output is under
    autocast; boxes, anchors, images and instances stay fp32, as they do under autocast."""
    if torch.is_tensor(obj):
        return obj.to(torch.bfloat16) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return type(obj)((k, _to_bf16(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_bf16(v) for v in obj)
    return obj  # Boxes, Instances, ImageList, ...


def _student_records_as_under_autocast(records: Records, module_targets) -> Records:
    """The student's module outputs in bf16 (what the heads see under AMP); method records unchanged."""
    data = {
        k: [(inputs, _to_bf16(out)) if k in module_targets else (inputs, out) for inputs, out in entries]
        for k, entries in records._data.items()
    }
    return Records(data)


@pytest.mark.parametrize("config", bccd_presets(), ids=lambda c: os.path.basename(c)[len("distill_"):-len(".yaml")])
def test_head_terms_under_bf16_autocast_match_fp32(tmp_path, precision_teachers, config):
    """
    The heads of ``config`` evaluated on one fixed step's records (fp32 student and teacher
    forwards, past every warm-up), once in fp32 and once as under ``SOLVER.AMP``: the student's
    module outputs rounded to bf16 and the head run under CPU bf16 autocast (teacher records
    fp32, as TeacherRunner hands them). Every term agrees within ``REL_TOL`` = 5e-2 relative
    (+ ``ABS_TOL`` = 1e-4 absolute, for terms near zero).

    Why 5e-2: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per value);
    adapters and attention blocks under autocast add a few such roundings, and a loss is a
    mean of squared or log-ratio differences of such values, so ~1e-2 relative error is
    expected and 5e-2 leaves a margin, while a softmax, divergence or normaliser left in bf16
    (or an fp16 overflow) is off by far more (e.g. a sum of ~1e5 squares in bf16 loses whole
    percent, a T-scaled softmax of large logits saturates).
    """
    kind = "retinanet" if "retinanet" in config else "rcnn"
    teacher_config, weights = precision_teachers[kind]
    cfg = distill_cfg(
        config, tmp_path, weights, teacher_config=teacher_config,
        opts=["DISTILL.WARMUP_ITERS", 0, "DISTILL.STOP_ITER", -1],
    )
    smaller(cfg)
    model = build_distiller(cfg)
    model.train()
    captured = {}
    for name, head in model.heads.items():
        if getattr(head, "needs_prototypes", False):
            _fill_gkd_prototypes(head)
        head.forward = _capturing(head.forward, captured, name)
    torch.manual_seed(0)
    with EventStorage(1000), torch.no_grad():
        model(synthetic_batch(sizes=((96, 112), (96, 128)), empty=()))
    student_targets = set(model.student_recorder.module_targets)

    mismatches, compared = {}, 0
    for name, (student, teacher, step) in captured.items():
        head = model.heads[name]
        del head.forward  # back to the class's forward
        reference = _evaluate(head, student, teacher, step, autocast=False)
        reduced = _evaluate(head, _student_records_as_under_autocast(student, student_targets), teacher, step, autocast=True)
        assert set(reduced) == set(reference), name
        for term, ref in reference.items():
            value = reduced[term]
            compared += 1
            assert math.isfinite(value), f"{name}/{term} is {value} under bf16 autocast"
            if abs(value - ref) > REL_TOL * abs(ref) + ABS_TOL:
                mismatches[f"{name}/{term}"] = (ref, value)
    assert compared or not cfg.DISTILL.HEADS, f"{config}: no term compared"
    assert not mismatches, f"terms off by more than rel {REL_TOL} (fp32, bf16): {mismatches}"


def _capturing(forward, captured, name):
    def wrapper(student, teacher, step):
        captured[name] = (student, teacher, step)
        return forward(student, teacher, step)

    return wrapper


def _evaluate(head, student, teacher, step, autocast):
    """The head's terms as floats, from a copy of it (heads with running state stay untouched)."""
    head = copy.deepcopy(head)
    torch.manual_seed(0)  # heads drawing random masks (MGD) draw the same ones
    with EventStorage(1000), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        terms = head(student, teacher, step)
    return {k: float(v.float()) for k, v in terms.items()}


# ---------------------------------------------------------------------------------------
# Modules given bf16 features
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_adapter_accepts_bf16_features(autocast):
    """Outside autocast the fp32 adapter casts bf16 input to its weights; under autocast it runs in bf16."""
    adapter = FeatureAdapter(8, 16, kernel_size=3, relu=True)
    x = torch.randn(2, 8, 6, 5).to(torch.bfloat16).float()  # exactly representable in bf16
    reference = adapter(x, size=(12, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = adapter(x.to(torch.bfloat16), size=(12, 10))
    assert out.shape == (2, 16, 12, 10) and torch.isfinite(out).all()
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)


def test_non_local_and_gc_block_accept_bf16_features():
    """FBKD's non-local block and FGD's GcBlock take bf16 maps, with and without autocast."""
    from d2kd.heads.fbkd.non_local import NonLocalBlock
    from d2kd.heads.fgd.gc_block import GlobalContextBlock

    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 5).to(torch.bfloat16).float()  # exactly representable in bf16
    for block in (NonLocalBlock(16, 8, pool_stride=2), GlobalContextBlock(16)):
        for p in block.parameters():  # not the identity of the zero initialisation
            torch.nn.init.normal_(p, std=0.2)
        reference = block(x)
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = block(x.to(torch.bfloat16))
            assert out.shape == reference.shape and torch.isfinite(out).all(), type(block).__name__
            torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------
# No CPU assumption: what the step creates follows its inputs' device
# ---------------------------------------------------------------------------------------

D2KD_DIR = os.path.dirname(os.path.abspath(__import__("d2kd").__file__)) + os.sep
FACTORIES = {
    torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.eye,
    torch.randn, torch.rand, torch.randint, torch.linspace, torch.as_tensor, torch.scalar_tensor,
}


class DeviceLessFactories(torch.overrides.TorchFunctionMode):
    """
    Records every tensor factory (``torch.zeros``, ``torch.tensor``, ...) called without a
    ``device=`` from d2kd's own code: such a tensor lands on the default device (the CPU)
    whatever device the step runs on.
    """

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(D2KD_DIR):
                self.calls.append(f"{caller.f_code.co_filename[len(D2KD_DIR):]}:{caller.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


@pytest.mark.train
@pytest.mark.parametrize("config", bccd_presets(), ids=lambda c: os.path.basename(c)[len("distill_"):-len(".yaml")])
def test_step_creates_no_tensor_on_the_default_device(tmp_path, precision_teachers, config):
    """
    A forward at iteration 0 (heads' own warm-ups) and one training step past every warm-up
    (forward, backward) of every preset's heads: no tensor
    factory in d2kd is called without ``device=`` (it would put the tensor on the CPU while the
    models are on a GPU), and the loss terms live on the student's device.
    """
    kind = "retinanet" if "retinanet" in config else "rcnn"
    teacher_config, weights = precision_teachers[kind]
    cfg = distill_cfg(
        config, tmp_path, weights, teacher_config=teacher_config,
        opts=["DISTILL.WARMUP_ITERS", 0, "DISTILL.STOP_ITER", -1],
    )
    smaller(cfg)
    model = build_distiller(cfg)
    model.train()
    for head in model.heads.values():
        if getattr(head, "needs_prototypes", False):
            _fill_gkd_prototypes(head)
    batch = synthetic_batch(sizes=((96, 112), (96, 128)), empty=(1,))
    recorder = DeviceLessFactories()
    with recorder:
        with EventStorage(0):  # heads' own warm-ups (zero terms)
            model(batch)
        with EventStorage(1000):
            losses = model(batch)
            sum(losses.values()).backward()
    assert not recorder.calls, f"tensor factories without device= in the step: {sorted(set(recorder.calls))}"
    assert {v.device for v in losses.values()} == {model.device}
