"""
tools/export_student.py on tiny runs: the student-only checkpoint and student_config.yaml load
into plain Detectron2 (DefaultPredictor, also in a process without d2kd), and the TorchScript
export reproduces the student's outputs; the MobileNetV2 student after ``import d2kd``.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.structures import Instances

from d2kd.config import load_config
from d2kd.deploy import D2KD_CONFIG_NAME, check_run_dir, export_student
from d2kd.deploy.export import compare_raw, reference_instances, sample_inputs

from conftest import REPO, load_test_cfg, train

IMAGE = os.path.join(REPO, "datasets", "bccd", "JPEGImages", "BloodImage_00007.jpg")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"d2kd_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_tool = load_tool("export_student")


def write_run_config(cfg, run_dir):
    """config.yaml as Detectron2's default_setup writes it, naming the run's test set."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = ("bccd_test",)  # the tests train without evaluating
    (run_dir / "config.yaml").write_text(cfg.dump())


@pytest.fixture(scope="module")
def r18_run(tmp_path_factory):
    """A d2kd run of the R18 student: 2 iterations with DistillTrainer, and an eval_results.json."""
    run = tmp_path_factory.mktemp("r18_run")
    cfg = load_test_cfg("bccd/student_R18_FPN.yaml", run, max_iter=2)
    train(cfg)
    write_run_config(cfg, run)
    (run / "eval_results.json").write_text(json.dumps({"bbox": {"AP": 12.5, "AP50": 30.0}}))
    return run


@pytest.fixture(scope="module")
def r18_export(r18_run):
    return export_tool.main([str(r18_run), "--runs", "1"])


@pytest.mark.train
def test_export_writes_the_student_only_checkpoint_and_config(r18_run, r18_export):
    export = r18_run / "export"
    assert {"model_final.pth", "student_config.yaml", "model.ts"} <= set(os.listdir(export))
    saved = torch.load(export / "model_final.pth", weights_only=True)
    run = torch.load(r18_run / "model_final.pth", weights_only=True)
    assert set(run) > {"model"} and list(saved) == ["model"]
    assert saved["model"].keys() == run["model"].keys()
    assert all(torch.equal(saved["model"][k], run["model"][k]) for k in run["model"])
    assert r18_export.sample_image.endswith(".jpg") and "bccd" in r18_export.sample_image


@pytest.mark.train
def test_plain_default_predictor_runs_the_exported_student(r18_run, r18_export):
    cfg = get_cfg()  # plain Detectron2, no set_new_allowed
    cfg.merge_from_file(str(r18_run / "export" / "student_config.yaml"))
    assert cfg.MODEL.WEIGHTS == str(r18_run / "export" / "model_final.pth")
    predictor = DefaultPredictor(cfg)
    student = torch.load(r18_run / "model_final.pth", weights_only=True)["model"]
    state = predictor.model.state_dict()
    assert state.keys() == student.keys()
    assert all(torch.equal(state[k], student[k]) for k in student)
    out = predictor(read_image(IMAGE, format="BGR"))["instances"]
    assert isinstance(out, Instances) and out.image_size == read_image(IMAGE).shape[:2]
    assert {"pred_boxes", "scores", "pred_classes"} <= set(out.get_fields())


@pytest.mark.train
def test_plain_detectron2_without_d2kd_runs_the_export(r18_run, r18_export):
    """A fresh interpreter importing only Detectron2 (as a deployment would)."""
    script = (
        "import sys, json, cv2, torch\n"
        "from detectron2.config import get_cfg\n"
        "from detectron2.engine import DefaultPredictor\n"
        "cfg = get_cfg(); cfg.merge_from_file(sys.argv[1])\n"
        "out = DefaultPredictor(cfg)(cv2.imread(sys.argv[2]))['instances']\n"
        "assert not any(m.split('.')[0] == 'd2kd' for m in sys.modules)\n"
        "print(json.dumps({'type': type(out).__name__, 'n': len(out), 'fields': sorted(out.get_fields())}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(r18_run / "export" / "student_config.yaml"), IMAGE],
        capture_output=True, text=True, cwd=str(r18_run), env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["type"] == "Instances" and result["n"] >= 0
    assert {"pred_boxes", "scores", "pred_classes"} <= set(result["fields"])


@pytest.mark.train
def test_torchscript_reproduces_the_student(r18_run, r18_export):
    diff = r18_export.max_diff
    assert diff["boxes"] <= 1e-4 and diff["scores"] <= 1e-4 and diff["raw"] <= 1e-4
    # Independently: reload model.ts and compare with the PyTorch student.
    cfg = load_config(str(r18_run / "export" / "student_config.yaml"))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    image = sample_inputs(cfg, r18_export.sample_image)["image"]
    ts_model = torch.jit.load(str(r18_run / "export" / "model.ts"))
    adapter = TracingAdapter(
        model, [{"image": image}], lambda m, x: [{"instances": m.inference(x, do_postprocess=False)[0]}]
    )
    with torch.no_grad():
        raw_ts, raw_py = ts_model(image), adapter(image)
    assert compare_raw(raw_py, raw_ts) <= 1e-4
    expected = reference_instances(model, image)
    actual = adapter.outputs_schema(raw_ts)[0]["instances"]
    assert len(actual) == len(expected)
    if len(expected):  # a 2-iteration student may detect nothing
        assert torch.allclose(actual.pred_boxes.tensor, expected.pred_boxes.tensor, atol=1e-4)
        assert torch.allclose(actual.scores, expected.scores, atol=1e-4)


@pytest.mark.train
def test_deploy_card(r18_export, capsys):
    card = r18_export.card
    assert card["ap"]["AP"] == 12.5 and card["classes"] == ["RBC", "WBC", "Platelets"]
    assert card["parameters"] > 1e6 and card["gflops"] > 0 and card["ms_pytorch"] > 0
    from d2kd.deploy import deploy_card

    text = deploy_card(r18_export)
    assert "12.50" in text and "GFLOPs" in text and "ms / image" in text and "parameters" in text


@pytest.mark.train
def test_onnx_is_written_or_skipped_with_a_message(r18_run, tmp_path):
    result = export_student(str(r18_run), str(tmp_path / "onnx"), fmt="onnx", runs=1)
    if importlib.util.find_spec("onnx") is None:
        assert result.onnx is None and any("onnx package is not installed" in m for m in result.messages)
    else:
        assert os.path.getsize(result.onnx) > 0
        if importlib.util.find_spec("onnxruntime") is not None:  # opset 16: RoiAlign aligned as Detectron2's
            assert result.max_diff["onnx"] <= 1e-4


def test_run_dir_must_hold_config_and_checkpoint(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing config.yaml and model_final.pth"):
        check_run_dir(str(tmp_path))
    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(FileNotFoundError, match="missing model_final.pth"):
        check_run_dir(str(tmp_path))
    with pytest.raises(SystemExit) as e:
        export_tool.main([str(tmp_path / "nowhere")])
    assert e.value.code == 1 and "Run folder not found" in capsys.readouterr().err


def test_mobilenet_student_exports_after_import_d2kd(tmp_path):
    """MNV2-FPN student (a saved model stands in for a trained one): config, predictor, TorchScript."""
    run = tmp_path / "mnv2_run"
    run.mkdir()
    cfg = load_test_cfg("bccd/student_MNV2_FPN.yaml", run, opts=["MODEL.MOBILENET.WIDTH_MULT", 0.5])
    torch.manual_seed(0)
    student = build_model(cfg)
    DetectionCheckpointer(student, save_dir=str(run)).save("model_final")
    write_run_config(cfg, run)

    result = export_student(str(run), runs=1)
    assert result.max_diff["boxes"] <= 1e-4 and result.max_diff["scores"] <= 1e-4 and result.max_diff["raw"] <= 1e-4
    export = run / "export"
    plain = get_cfg()
    plain.merge_from_file(str(export / "student_config.yaml"))  # plain keys only
    cfg2 = load_config(str(export / D2KD_CONFIG_NAME))  # after `import d2kd`: the same student
    predictor = DefaultPredictor(cfg2)
    state = predictor.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())
    out = predictor(read_image(IMAGE, format="BGR"))["instances"]
    assert isinstance(out, Instances)
