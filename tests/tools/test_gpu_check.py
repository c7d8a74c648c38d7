"""tools/gpu_check.py: its CPU quick mode end to end (the GPU run itself needs a GPU machine)."""

import importlib.util
import json
import os

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("tools_gpu_check", os.path.join(REPO, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presets_are_every_faster_rcnn_and_retinanet_coco_preset(gpu_check):
    presets = gpu_check.discover_presets()
    assert "fitnet" in presets and "fitnet_retinanet" in presets and "kd" in presets
    assert not any("mask" in name for name in presets)
    assert all(os.path.basename(p).startswith("distill_") and p.endswith("_R101_R50.yaml") for p in presets.values())
    assert len(presets) == len([n for n in os.listdir(os.path.join(REPO, "configs", "coco"))
                                if n.startswith("distill_") and n.endswith("_R101_R50.yaml") and "mask" not in n])


@pytest.mark.train
def test_gpu_check_quick_on_cpu(tmp_path, results_dir_untouched, gpu_check):
    """2 presets x fp32 / AMP (CPU bf16) / bf16 teacher, 1 + 2 steps at 128 px: finite terms, times, JSON and Markdown."""
    assert gpu_check.main(["--quick", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_quick.json").read_text())
    assert report["all_finite"] and not report["failed"] and not report["not_run"]
    assert [p["preset"] for p in report["presets"]] == ["fitnet", "fitnet_retinanet"]
    assert report["setup"]["amp_precision"] == "bfloat16" and report["setup"]["iters"] == 2
    for preset in report["presets"]:
        assert list(preset["modes"]) == ["fp32", "amp", "bf16_teacher"]
        assert "random" in preset["teacher"] and preset["teacher_parts"] == ["backbone"]
        for mode, row in preset["modes"].items():
            assert row["finite"] and row["kd_terms"] > 0, (preset["preset"], mode)
            t = row["time_ms"]
            assert all(t[p] > 0 for p in ("student", "teacher", "distill"))
            assert row["ratio"] == pytest.approx(t["distill"] / (t["student"] + t["teacher"]))
        assert preset["amp_speedup"] > 0 and preset["bf16_teacher_speedup"] > 0
    markdown = (tmp_path / "gpu_check_quick.md").read_text()
    assert "| fitnet_retinanet | bf16_teacher | ✓ |" in markdown
