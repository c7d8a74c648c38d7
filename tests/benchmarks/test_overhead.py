"""benchmarks/overhead.py: its --quick mode end to end, and the teacher weights each method is timed with."""

import json
import os

import pytest

from conftest import REPO
from d2kd.config import load_config
from study import overhead_steps


@pytest.mark.train
def test_overhead_quick(tmp_path, results_dir_untouched, load_script):
    overhead = load_script("overhead")
    assert overhead.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead_quick.json").read_text())
    (row,) = data["methods"]
    assert row["method"] == "fitnet" and row["teacher_parts"] == ["backbone"] and not row["uses_roi_head"]
    t = {k: v["median"] for k, v in row["time_ms"].items()}
    assert all(v > 0 for v in t.values()) and row["time_ms"]["distill"]["n"] == 2
    assert row["ratio"] == pytest.approx(t["distill"] / (t["student"] + t["teacher"]))
    assert row["ratio_target"] == 1.10 and "random" in data["setup"]["teacher_weights"]
    mem = row.get("memory_mb")
    if mem is not None:  # Linux: peak RSS per phase
        # kept tensors: the distillation step holds the student, the teacher and the adapters
        assert mem["distill"]["state"] > mem["student"]["state"] + 0.99 * mem["teacher"]["state"]
        assert row["memory_ratio"] == pytest.approx(
            mem["distill"]["total"] / (mem["student"]["total"] + mem["teacher"]["total"])
        )
    assert "t_distill / (t_student + t_teacher)" in (tmp_path / "overhead_quick.md").read_text()
    assert row["step_precision"] == "fp32" and data["amp_speedup"] == []


@pytest.mark.train
def test_overhead_step_precision_reports_the_amp_speedup(tmp_path, results_dir_untouched, load_script):
    """--step-precision fp32 bf16: one row per precision (AMP rows run the step under CPU bf16 autocast), and
    the whole-step speed-up is the fp32 row's median time over the AMP row's."""
    overhead = load_script("overhead")
    argv = ["--quick", "--methods", "kd", "--step-precision", "fp32", "bf16", "--output-dir", str(tmp_path)]
    assert overhead.main(argv) == 0
    data = json.loads((tmp_path / "overhead_quick.json").read_text())
    fp32, bf16 = data["methods"]
    assert (fp32["step_precision"], bf16["step_precision"]) == ("fp32", "bf16")
    (speedup,) = data["amp_speedup"]
    for phase in ("student", "teacher", "distill"):
        expected = fp32["time_ms"][phase]["median"] / bf16["time_ms"][phase]["median"]
        assert speedup[f"{phase}_speedup"] == pytest.approx(expected)
    assert "Whole-step mixed-precision speed-up" in (tmp_path / "overhead_quick.md").read_text()


def test_overhead_refuses_a_step_precision_that_is_not_one(load_script):
    overhead = load_script("overhead")
    with pytest.raises(ValueError, match="--step-precision 'bf17' is not a precision"):
        overhead.main(["--quick", "--step-precision", "bf17", "--output-dir", "/tmp/unused"])


def test_overhead_given_weights_apply_only_to_their_teacher(tmp_path, teacher_r50_weights):
    """--teacher-weights of the Faster R-CNN teacher must not be forced onto a RetinaNet
    preset (a strict-load failure): that method falls back to auto and says why."""
    cache = {}
    frcnn = load_config(os.path.join(REPO, "configs/bccd/distill_fitnet_R50_R18.yaml"))
    path, note = overhead_steps.teacher_weights_for(frcnn, teacher_r50_weights, str(tmp_path), cache)
    assert path == teacher_r50_weights and note.startswith("given")
    retina = load_config(os.path.join(REPO, "configs/bccd/distill_fitnet_retinanet_R50_R18.yaml"))
    retina.merge_from_list(["DISTILL.TEACHER.WEIGHTS", str(tmp_path / "no_such_teacher.pth")])
    path, note = overhead_steps.teacher_weights_for(retina, teacher_r50_weights, str(tmp_path), cache)
    assert path != teacher_r50_weights and os.path.isfile(path)
    assert note.startswith("random") and "another architecture" in note
    assert len(cache) == 2  # one teacher built per teacher config
