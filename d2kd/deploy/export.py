"""
Export the student of a d2kd run for deployment (``tools/export_student.py``).

``export_student(run_dir)`` writes ``run_dir/export/``:

- ``model_final.pth``: only the student (the ``"model"`` entry of the run's checkpoint, without
  d2kd's ``"distiller"``, ``"trainer"`` and ``"rng"`` entries);
- ``student_config.yaml`` (and ``student_config_d2kd.yaml`` for a backbone d2kd registers):
  :mod:`d2kd.deploy.student_config`, with MODEL.WEIGHTS pointing at that ``model_final.pth``;
- ``model.ts``: TorchScript, traced with Detectron2's ``TracingAdapter`` as Detectron2's
  ``tools/deploy/export_model.py --export-method tracing`` does (for R-CNNs the traced function
  is ``model.inference(..., do_postprocess=False)``: boxes are in the pixels of the resized
  network input, the final resize to the original image is left to the caller);
- ``model.onnx`` with ``fmt="onnx"``, when the ``onnx`` package is importable (skipped with a
  message otherwise), exported from the same TracingAdapter with opset 16 (Detectron2's default
  opset 11 has no aligned RoiAlign); it is checked against PyTorch when ``onnxruntime`` is
  importable.

The student is rebuilt from the written config (``d2kd.config.load_config``), so the export
also checks that config. The exported model's boxes and scores are compared with the PyTorch
model's on a sample image, and a deploy card reports AP (the run's ``eval_results.json``),
parameters, GFLOPs (fvcore's count, one multiply-add = one flop) and ms per image here.

Loading the run's ``config.yaml`` needs the keys of the heads it used: ``import d2kd`` (which
registers the heads and backbones) before calling :func:`export_student`; register the run's
datasets too (``d2kd.data``) for the default sample image and the class names.
"""

import importlib.util
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, build_model

from ..config import load_config
from ..files import SafeDetectionCheckpointer, read_checkpoint
from .student_config import D2KD_CONFIG_NAME, read_class_names, write_student_config

__all__ = [
    "ExportResult",
    "check_run_dir",
    "compare_instances",
    "deploy_card",
    "export_onnx",
    "export_student",
    "find_sample_image",
    "read_ap",
    "sample_inputs",
    "save_student_weights",
    "trace_student",
]

logger = logging.getLogger(__name__)

ONNX_OPSET = 16
# Largest |difference| between an exported model's outputs and PyTorch's that the export accepts.
TOLERANCE = 1e-3


@dataclass
class ExportResult:
    """What :func:`export_student` wrote and measured."""

    output_dir: str
    weights: str
    config: str
    torchscript: str
    onnx: Optional[str] = None
    sample_image: str = ""
    # Largest absolute differences between the exported and the PyTorch model.
    max_diff: Dict[str, float] = field(default_factory=dict)
    num_detections: int = 0
    card: Dict[str, object] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)


def check_run_dir(run_dir: str):
    """(config.yaml, model_final.pth) of ``run_dir``; FileNotFoundError naming what is missing."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"Run folder not found: {run_dir}")
    paths = [os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "model_final.pth")]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{run_dir} is not a finished d2kd run: missing {' and '.join(missing)} (a run's OUTPUT_DIR holds "
            "config.yaml, written at start-up, and model_final.pth, written when training ends)."
        )
    return paths[0], paths[1]


def save_student_weights(checkpoint: str, path: str) -> str:
    """Write ``{"model": <the student's state_dict>}`` of a d2kd checkpoint to ``path``."""
    data = read_checkpoint(checkpoint)  # weights_only=True: no code runs from the file
    state = data["model"] if isinstance(data, dict) and "model" in data else data
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": state}, tmp)
    os.replace(tmp, path)
    return path


def find_sample_image(cfg) -> str:
    """The first image of ``DATASETS.TEST[0]``, else of ``bccd_test``, when registered."""
    registered = set(DatasetCatalog.list())
    for name in list(cfg.DATASETS.TEST) + ["bccd_test"]:
        if name in registered:
            try:
                dicts = DatasetCatalog.get(name)
            except Exception as e:  # a registered dataset whose files are not here
                logger.warning(f"Cannot read dataset {name} for a sample image: {e}")
                continue
            if dicts:
                return dicts[0]["file_name"]
    raise FileNotFoundError(
        "No sample image: DATASETS.TEST of the run names no registered dataset with images, and "
        "bccd_test is not registered. Pass one (--sample-image IMG)."
    )


def sample_inputs(cfg, image_path: str) -> Dict:
    """The model input of ``image_path``, preprocessed as Detectron2's DefaultPredictor does."""
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"Sample image not found: {image_path}")
    original = detection_utils.read_image(image_path, format=cfg.INPUT.FORMAT)
    height, width = original.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(original).apply_image(original)
    image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return {"image": image, "height": height, "width": width}


def _inference_fn(model):
    if isinstance(model, GeneralizedRCNN):

        def inference(model, inputs):
            # do_postprocess=False, as Detectron2's export_model.py: no resize to the original size
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]

        return inference
    return None  # RetinaNet & co: the model is called directly


def reference_instances(model, image: torch.Tensor):
    """The PyTorch model's Instances for ``image``, as the traced model computes them."""
    with torch.no_grad():
        inference = _inference_fn(model)
        inputs = [{"image": image}]
        return (inference(model, inputs) if inference else model(inputs))[0]["instances"]


def trace_student(model, image: torch.Tensor):
    """(TracingAdapter, TorchScript module) of ``model`` traced on ``image`` (Detectron2's recipe)."""
    from detectron2.export import TracingAdapter

    adapter = TracingAdapter(model, [{"image": image}], _inference_fn(model))
    adapter.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Detectron2's shape asserts are constants for the trace; their warnings are expected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ts_model = torch.jit.trace(adapter, (image,))
    return adapter, ts_model


def export_onnx(adapter, image: torch.Tensor, path: str) -> Optional[str]:
    """``adapter`` as ONNX at ``path`` (TorchScript-based exporter); None when ``onnx`` is not installed."""
    if importlib.util.find_spec("onnx") is None:
        return None
    from detectron2.export import STABLE_ONNX_OPSET_VERSION

    # Opset 16 is the first whose RoiAlign has "half_pixel" coordinates, i.e. Detectron2's
    # ROIAlign(aligned=True); with Detectron2's STABLE_ONNX_OPSET_VERSION (11) an R-CNN's
    # scores and boxes come out shifted.
    kwargs = {"opset_version": max(STABLE_ONNX_OPSET_VERSION, ONNX_OPSET)}
    try:
        import inspect

        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False  # the tracing exporter of Detectron2's export_model.py
    except (TypeError, ValueError):  # pragma: no cover
        pass
    with torch.no_grad(), warnings.catch_warnings(), open(path, "wb") as f:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(adapter, (image,), f, **kwargs)
    return path


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.float() - b.float()).abs().max())


def compare_instances(expected, actual) -> Dict[str, float]:
    """Largest |difference| of boxes and scores (inf when the numbers of detections differ)."""
    return {
        "boxes": _max_abs(expected.pred_boxes.tensor, actual.pred_boxes.tensor),
        "scores": _max_abs(expected.scores, actual.scores),
        "classes": _max_abs(expected.pred_classes, actual.pred_classes),
    }


def compare_raw(expected, actual) -> float:
    """Largest |difference| between two flat tuples of output tensors."""
    if len(expected) != len(actual):
        return float("inf")
    return max((_max_abs(a, b) for a, b in zip(expected, actual)), default=0.0)


def _onnx_outputs(path: str, image: torch.Tensor):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return tuple(torch.as_tensor(o) for o in session.run(None, {name: image.numpy()}))


def read_ap(run_dir: str) -> Optional[Dict[str, float]]:
    """The student's bbox metrics of ``run_dir/eval_results.json`` (None when absent)."""
    path = os.path.join(run_dir, "eval_results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if "bbox" in results:
        return results["bbox"]
    for key, value in results.items():  # several test datasets: the first one's
        if not key.startswith("teacher") and isinstance(value, dict) and "bbox" in value:
            return value["bbox"]
    return None


def _median_ms(fn, runs: int) -> float:
    with torch.no_grad():
        fn()  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _gflops(model, inputs) -> Optional[float]:
    try:
        from detectron2.utils.analysis import FlopCountAnalysis

        counter = FlopCountAnalysis(model, [inputs])
        counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return counter.total() / 1e9
    except Exception as e:  # a counting problem must not fail the export
        logger.warning(f"FLOP count failed: {e}")
        return None


def deploy_card(result: ExportResult) -> str:
    """The deploy card of ``result`` as text."""
    c = result.card
    ap = c.get("ap")
    ap_text = (
        f"{ap.get('AP', float('nan')):.2f} (AP50 {ap.get('AP50', float('nan')):.2f}; eval_results.json)"
        if ap
        else "n/a (no eval_results.json in the run)"
    )
    flops = c.get("gflops")
    size = c.get("input_size", ("?", "?"))
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in result.max_diff.items())
    classes = c.get("classes") or []
    lines = [
        f"Deploy card: {c.get('run_dir')}",
        f"  model        {c.get('architecture')} / {c.get('backbone')}, {len(classes)} classes {classes}",
        f"  AP (bbox)    {ap_text}",
        f"  parameters   {c.get('parameters', 0) / 1e6:.2f} M",
        "  GFLOPs       " + (f"{flops:.2f}" if flops is not None else "n/a")
        + f" (fvcore, 1 multiply-add = 1 flop; input {size[0]}x{size[1]})",
        f"  ms / image   PyTorch {c.get('ms_pytorch', float('nan')):.1f}, TorchScript "
        f"{c.get('ms_torchscript', float('nan')):.1f} (median of {c.get('runs')}, {c.get('device')}, "
        f"{torch.get_num_threads()} threads)",
        f"  export       {result.num_detections} detections on {os.path.basename(result.sample_image)}; "
        f"largest |diff| vs PyTorch: {diffs}",
        f"  files        {result.output_dir}: " + ", ".join(
            os.path.basename(p) for p in (result.weights, result.config, result.torchscript, result.onnx) if p
        ),
    ]
    return "\n".join(lines)


def export_student(
    run_dir: str, output_dir: Optional[str] = None, fmt: str = "torchscript", sample_image: Optional[str] = None,
    runs: int = 5,
) -> ExportResult:
    """
    Export the student of the finished d2kd run ``run_dir`` to ``output_dir`` (default
    ``run_dir/export``); see the module docstring. Raises ``RuntimeError`` when the TorchScript
    (or, checked with onnxruntime, the ONNX) model's outputs differ from PyTorch's by more
    than :data:`TOLERANCE`.
    """
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"fmt must be 'torchscript' or 'onnx', got {fmt!r}")
    config_file, checkpoint = check_run_dir(run_dir)
    output_dir = output_dir or os.path.join(run_dir, "export")
    os.makedirs(output_dir, exist_ok=True)
    run_cfg = load_config(config_file)

    weights = save_student_weights(checkpoint, os.path.join(output_dir, "model_final.pth"))
    config = write_student_config(run_cfg, output_dir, weights=os.path.abspath(weights))
    d2kd_config = os.path.join(output_dir, D2KD_CONFIG_NAME)
    # Rebuild the student from the written config: the export checks it, too.
    opts = []
    if run_cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        opts = ["MODEL.DEVICE", "cpu"]
    cfg = load_config(d2kd_config if os.path.isfile(d2kd_config) else config, opts)
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()

    result = ExportResult(output_dir, weights, config, os.path.join(output_dir, "model.ts"))
    result.sample_image = sample_image or find_sample_image(run_cfg)
    inputs = sample_inputs(cfg, result.sample_image)
    image = inputs["image"].to(model.device)

    adapter, ts_model = trace_student(model, image)
    ts_model.save(result.torchscript)
    ts_model = torch.jit.load(result.torchscript, map_location=model.device)  # check the file, not the object
    expected = reference_instances(model, image)
    with torch.no_grad():
        raw_expected = adapter(image)
        raw_ts = ts_model(image)
    actual = adapter.outputs_schema(raw_ts)[0]["instances"]
    result.num_detections = len(expected)
    result.max_diff = dict(compare_instances(expected, actual), raw=compare_raw(raw_expected, raw_ts))
    logger.info(f"TorchScript outputs schema: {adapter.outputs_schema}")
    if max(result.max_diff["boxes"], result.max_diff["scores"]) > TOLERANCE:
        raise RuntimeError(f"The TorchScript model differs from PyTorch on {result.sample_image}: {result.max_diff}")

    if fmt == "onnx":
        result.onnx = export_onnx(adapter, image, os.path.join(output_dir, "model.onnx"))
        if result.onnx is None:
            result.messages.append("ONNX skipped: the onnx package is not installed (pip install onnx).")
        elif importlib.util.find_spec("onnxruntime") is None:
            result.messages.append("ONNX written, not checked: onnxruntime is not installed.")
        else:
            result.max_diff["onnx"] = compare_raw(raw_expected, _onnx_outputs(result.onnx, image.cpu()))
            if result.max_diff["onnx"] > TOLERANCE:
                raise RuntimeError(f"The ONNX model differs from PyTorch on {result.sample_image}: {result.max_diff}")

    params = sum(p.numel() for p in model.parameters())
    result.card = {
        "run_dir": os.path.abspath(run_dir),
        "architecture": cfg.MODEL.META_ARCHITECTURE,
        "backbone": cfg.MODEL.BACKBONE.NAME,
        "classes": read_class_names(config),
        "ap": read_ap(run_dir),
        "parameters": params,
        "gflops": _gflops(model, inputs),
        "input_size": tuple(image.shape[-2:]),
        "ms_pytorch": _median_ms(lambda: model([inputs]), runs),
        "ms_torchscript": _median_ms(lambda: ts_model(image), runs),
        "runs": runs,
        "device": str(model.device),
    }
    return result
