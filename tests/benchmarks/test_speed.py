"""benchmarks/speed.py: its --quick mode end to end."""

import json

import pytest


def test_speed_quick(tmp_path, results_dir_untouched, load_script):
    speed = load_script("speed")
    assert speed.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_quick.json").read_text())
    teacher, student = data["models"]["teacher"], data["models"]["student"]
    assert (teacher["depth"], student["depth"]) == (50, 18)
    assert teacher["params"]["total"] > student["params"]["total"] > 0
    assert teacher["gflops"]["backbone"] > student["gflops"]["backbone"] > 0
    assert student["time_ms"]["n"] == 2 and student["time_ms"]["median"] > 0
    ratio = data["student_vs_teacher"]
    assert ratio["speedup"] == pytest.approx(teacher["time_ms"]["median"] / student["time_ms"]["median"])
    assert ratio["params_ratio"] == pytest.approx(student["params"]["total"] / teacher["params"]["total"])
    assert "student / teacher" in (tmp_path / "speed_quick.md").read_text()
