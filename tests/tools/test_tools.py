"""tools/plot_metrics.py and tools/visualize_detections.py on tiny inputs."""

import importlib.util
import json
import os

import pytest
from PIL import Image

from conftest import CONFIGS, REPO


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"d2kd_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_metrics = load_tool("plot_metrics")
visualize_detections = load_tool("visualize_detections")


def write_metrics(path, distill=True):
    lines = []
    for it in range(0, 40, 10):
        entry = {"iteration": it + 9, "total_loss": 3.0 - 0.05 * it, "loss_cls": 1.0 - 0.01 * it,
                 "loss_box_reg": 0.5, "loss_rpn_cls": 0.7, "loss_rpn_loc": 0.1, "lr": 0.02, "data_time": 0.01}
        if distill:
            entry.update({"loss_kd_fitnet_p2": 1.5 - 0.02 * it, "loss_kd_fitnet_p6": 0.001, "loss_kd_kd": 0.004})
        lines.append(json.dumps(entry))
    if distill:
        lines.append(json.dumps({"iteration": 39, "bbox/AP": 12.5, "bbox/AP50": 30.0,
                                 "teacher/bbox/AP": 40.0, "teacher/bbox/AP50": 70.0}))
    # A resumed run repeats iteration 29 with other values; a killed run leaves a partial line.
    lines.append(json.dumps({"iteration": 29, "total_loss": 1.75, "loss_cls": 0.5}))
    lines.append('{"iteration": 49, "total_lo')
    path.write_text("\n".join(lines))
    return path


def test_read_metrics_keeps_the_last_record_of_an_iteration(tmp_path):
    records = plot_metrics.read_metrics(str(write_metrics(tmp_path / "metrics.json")))
    assert list(records) == [9, 19, 29, 39]
    assert records[29]["total_loss"] == 1.75 and records[29]["loss_box_reg"] == 0.5
    assert records[39]["teacher/bbox/AP"] == 40.0 and records[39]["loss_kd_kd"] == 0.004
    with pytest.raises(FileNotFoundError, match="No metrics file"):
        plot_metrics.read_metrics(str(tmp_path / "none"))


def test_plot_metrics_writes_a_png_with_one_panel_per_group(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.json")
    out = plot_metrics.main([str(run), "--smooth", "2"])
    assert out == str(run / "training_curves.png")
    with Image.open(out) as image:
        # 9 x 3.2 inches per panel at 100 dpi; panels: detector, distillation, AP.
        assert image.size == (900, 960)
        assert len(set(image.convert("L").getdata())) > 10, "the plot is not blank"
    assert os.path.getsize(out) > 10_000

    write_metrics(tmp_path / "plain.json", distill=False)
    out = plot_metrics.plot_metrics(str(tmp_path / "plain.json"), str(tmp_path / "plain.png"))
    with Image.open(out) as image:
        assert image.size == (900, 320)  # detector losses only


def test_visualize_detections_draws_truth_teacher_and_student(tmp_path, teacher_r18_weights):
    opts = [
        "DISTILL.TEACHER.CONFIG_FILE", os.path.join(CONFIGS, "bccd/student_R18_FPN.yaml"),
        "DISTILL.TEACHER.WEIGHTS", teacher_r18_weights,
        "DISTILL.TEACHER.OPTS", "['INPUT.MIN_SIZE_TEST', 96, 'INPUT.MAX_SIZE_TEST', 128]",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    ]
    config = os.path.join(CONFIGS, "bccd/distill_fitnet_R50_R18.yaml")
    out = str(tmp_path / "vis.png")
    written = visualize_detections.main(
        ["--config-file", config, "--student-weights", teacher_r18_weights, "--dataset", "bccd_test",
         "--indices", "0", "--output", out, "--score-thresh", "0.0"] + opts
    )
    assert written == [out]
    with Image.open(out) as image:
        # BCCD images are 640x480: three panels (truth, teacher, student) 8 px apart, a 28 px title bar.
        assert image.size == (3 * 640 + 2 * 8, 480 + 28)
        assert image.mode == "RGB"
    assert os.path.getsize(out) > 50_000

    image_file = os.path.join(REPO, "datasets", "bccd", "JPEGImages", "BloodImage_00000.jpg")
    written = visualize_detections.main(
        ["--config-file", config, "--student-weights", teacher_r18_weights, "--image", image_file,
         "--output-dir", str(tmp_path / "many")] + opts
    )
    with Image.open(written[0]) as image:
        assert image.size == (2 * 640 + 8, 480 + 28)  # no ground truth for a bare image file

    with pytest.raises(FileNotFoundError, match="Student weights not found"):
        visualize_detections.main(["--config-file", config, "--student-weights", str(tmp_path / "none.pth"),
                                   "--image", image_file] + opts)
