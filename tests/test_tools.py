"""tools/plot_metrics.py, tools/visualize_detections.py and tools/trace_steps.py on tiny inputs."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, distill_cfg


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"d2kd_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_metrics = load_tool("plot_metrics")
visualize_detections = load_tool("visualize_detections")
trace_steps = load_tool("trace_steps")
proposal_recall = load_tool("proposal_recall")


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


def test_group_statistics_by_hand():
    model = torch.nn.Module()
    model.body = torch.nn.Module()
    model.body.a = torch.nn.Linear(2, 3)
    model.body.b = torch.nn.Linear(3, 1)
    model.head = torch.nn.Linear(1, 1)
    g = torch.Generator().manual_seed(0)
    for p in model.body.parameters():
        p.data = torch.randn(p.shape, generator=g)
        p.grad = torch.randn(p.shape, generator=g)
    model.head.weight.data.fill_(-7.0)  # no gradient in this group
    stats = trace_steps.group_statistics(model.named_parameters(), depth=1)
    body = [p for p in model.body.parameters()]
    expected_norm = np.sqrt(sum((p.grad.numpy().astype(np.float64) ** 2).sum() for p in body))
    assert stats["body"]["grad_norm"] == pytest.approx(expected_norm, rel=1e-12)
    assert stats["body"]["max_abs"] == pytest.approx(max(np.abs(p.data.numpy()).max() for p in body))
    assert stats["head"] == {"grad_norm": None, "max_abs": 7.0}
    assert set(trace_steps.group_statistics(model.named_parameters(), depth=2)) == {"body.a", "body.b", "head.weight", "head.bias"}


def test_trace_steps_records_each_step_and_stops_at_divergence(tmp_path, teacher_r18_weights, monkeypatch):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", str(tmp_path / "run"), teacher_r18_weights, max_iter=10)
    cfg.freeze()
    out = tmp_path / "trace.jsonl"
    records = trace_steps.trace(cfg, 2, str(out))
    assert [r["iteration"] for r in records] == [0, 1]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    for r in records:
        assert np.isfinite(r["total_loss"]) and r["loss_kd_fitnet_p2"] > 0 and r["lr"] > 0
        assert r["groups"]["student.backbone.bottom_up"]["grad_norm"] > 0
        assert any(g.startswith("heads.fitnet") and s["grad_norm"] for g, s in r["groups"].items())
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))  # no final step or evaluation

    from d2kd import DistillTrainer

    calls = []
    original = DistillTrainer.run_step

    def diverge_on_second_step(self):
        calls.append(self.iter)
        if len(calls) == 2:
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
        original(self)

    monkeypatch.setattr(DistillTrainer, "run_step", diverge_on_second_step)
    records = trace_steps.trace(cfg, 5, str(out))
    assert [r["iteration"] for r in records] == [0, 1] and "Inf/NaN" in records[-1]["diverged"]
    assert "groups" in records[0] and len(out.read_text().splitlines()) == 2


def test_covered_per_class_by_hand():
    """A ground-truth box is covered at k when one of the first k proposals has IoU >= 0.5 with it."""
    from d2kd.benchmark.proposal_recall import covered_per_class

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 54.0, 54.0]])
    classes = torch.tensor([0, 0, 1])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 12.0],    # IoU 100/120 = 0.83 with gt 0
        [40.0, 40.0, 45.0, 45.0],  # overlaps nothing
        [20.0, 20.0, 30.0, 40.0],  # IoU 100/200 = 0.5 with gt 1: covered (>=)
        [50.0, 50.0, 58.0, 58.0],  # IoU 16/64 = 0.25 with gt 2: not covered
    ])
    assert covered_per_class(proposals, gt, classes, [1, 2, 4]) == {
        1: {0: [1, 2], 1: [0, 1]}, 2: {0: [1, 2], 1: [0, 1]}, 4: {0: [2, 2], 1: [0, 1]}}
    assert covered_per_class(proposals, gt, classes, [4], iou_threshold=0.2)[4] == {0: [2, 2], 1: [1, 1]}
    assert covered_per_class(proposals, gt[:0], classes[:0], [4]) == {4: {}}


def test_proposal_recall_tool_gives_one_checkpoint_the_same_recall_twice(tmp_path, teacher_r18_weights):
    """The same weights under two names give the same table (the ground truth is rescaled once,
    not once per checkpoint: detectron2's transform_instance_annotations edits its input), and
    weights that do not fit the config are refused, not measured as a random model."""
    out = tmp_path / "recall.md"
    results = proposal_recall.main([
        "--config-file", os.path.join(CONFIGS, "bccd", "student_R18_FPN.yaml"), "--dataset", "bccd_val",
        "--top-k", "10", "100", "--output", str(out), "--weights", f"a={teacher_r18_weights}", f"b={teacher_r18_weights}",
        "--max-images", "2", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"])
    assert results["a"] == results["b"]
    assert set(results["a"]) == {10, 100} and set(results["a"][100]) <= {"RBC", "WBC", "Platelets"}
    for k in (10, 100):
        assert all(0.0 <= v <= 100.0 for v in results["a"][k].values())
    assert all(results["a"][100][c] >= results["a"][10][c] for c in results["a"][10])  # more proposals cover more
    text = out.read_text()
    assert "Recall (%) of the top 100 proposals" in text and "python tools/proposal_recall.py" in text
    with pytest.raises(RuntimeError, match="do not fit the student"):
        proposal_recall.main(["--config-file", os.path.join(CONFIGS, "bccd", "teacher_R50_FPN.yaml"),
                              "--weights", f"a={teacher_r18_weights}", "--max-images", "1"])
    with pytest.raises(SystemExit):
        proposal_recall.main(["--config-file", os.path.join(CONFIGS, "bccd", "student_R18_FPN.yaml"),
                              "--weights", f"a={tmp_path / 'missing.pth'}"])
