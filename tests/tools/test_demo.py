"""tools/demo.py (`make demo`) and benchmarks/demo_seeds.py in their --quick modes, end to end."""

import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import demo  # noqa: E402  (tools/demo.py)

pytestmark = pytest.mark.train  # every test reads the quick demo's runs

ROWS = ("| teacher |", "| baseline (student, no distillation) |", "| distilled (student, chen2017, no hints) |")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``tools/demo.py --quick`` from scratch: its output folder and what it printed."""
    root = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--quick", "--output-root", str(root)],
        cwd=str(root), env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout


def _table(stdout):
    """The demo's table (Detectron2's evaluation tables are in the output too), separator left out."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| model | AP |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [line for line in table if "---" not in line]


def test_demo_quick_prints_one_table_and_two_pictures(quick_demo):
    root, stdout = quick_demo
    table = _table(stdout)
    assert table[0] == "| model | AP | AP50 | AP75 | ΔAP vs baseline |"
    rows = table[1:]
    assert len(rows) == 3 and all(row.startswith(label) for row, label in zip(rows, ROWS)), table
    cells = [r.strip("|").split("|") for r in rows]
    assert all(len(c) == 5 for c in cells)
    assert cells[0][4].strip() == "–" and cells[1][4].strip() == "–"
    ap = {name: float(c[1]) for name, c in zip(("teacher", "baseline", "distilled"), cells)}
    assert float(cells[2][4]) == pytest.approx(ap["distilled"] - ap["baseline"], abs=0.11)
    # Three runs, the students with the same seed, the baseline without heads.
    for name in ("teacher_R50", "baseline_seed0", "distilled_seed0"):
        assert (root / name / "model_final.pth").is_file() and (root / name / "eval_results.json").is_file()
    configs = {n: yaml.safe_load((root / n / "config.yaml").read_text()) for n in ("baseline_seed0", "distilled_seed0")}
    assert configs["baseline_seed0"]["DISTILL"]["HEADS"] == []
    assert configs["distilled_seed0"]["DISTILL"]["HEADS"] == ["chen2017"]
    assert configs["baseline_seed0"]["SEED"] == configs["distilled_seed0"]["SEED"] == 0
    assert configs["distilled_seed0"]["DISTILL"]["TEACHER"]["WEIGHTS"] == str(root / "teacher_R50" / "model_final.pth")
    for picture in ("detections.png", "curves.png"):
        path = root / picture
        assert path.is_file() and path.stat().st_size > 10_000, picture
        assert str(path) in stdout
    saved = (root / "demo_table.md").read_text().splitlines()
    assert [line for line in saved if "---" not in line] == table


def test_demo_second_run_reuses_the_three_runs(quick_demo, monkeypatch, capsys):
    root, first = quick_demo
    names = ("teacher_R50", "baseline_seed0", "distilled_seed0")
    weights = {n: os.path.getmtime(root / n / "model_final.pth") for n in names}
    monkeypatch.chdir(REPO)  # main() works from the repository root; restored afterwards
    summary = demo.main(["--quick", "--output-root", str(root)])
    out = capsys.readouterr().out
    assert summary["status"] == {"teacher": "reused", "baseline": "reused", "distilled": "reused"}
    assert out.count("reusing") == 3 and "done in" not in out
    assert _table(out) == _table(first)
    assert weights == {n: os.path.getmtime(root / n / "model_final.pth") for n in weights}
    assert os.path.getsize(summary["detections"]) > 10_000 and os.path.getsize(summary["curves"]) > 10_000


def test_demo_trains_again_when_the_config_or_the_teacher_changed(quick_demo, tmp_path, monkeypatch):
    root, _ = quick_demo
    monkeypatch.chdir(REPO)
    teacher, baseline, distilled = demo.demo_runs(
        demo.DEFAULT_TEACHER_CONFIG, demo.DEFAULT_DISTILL_CONFIG, 0, True, str(root)
    )
    assert baseline.config_changes() == [] and not distilled.inputs_changed()
    changed = demo.Run("baseline", baseline.config_file, baseline.output_dir,
                       baseline.opts + ["SOLVER.BASE_LR", "0.001"], baseline.test_images)
    assert changed.config_changes() == ["SOLVER.BASE_LR"]
    stale = demo.Run("distilled", distilled.config_file, distilled.output_dir, inputs=[baseline.weights])
    assert stale.inputs_changed()  # stamped with the teacher's weights, not these
    # An --eval-only of a finished run (no eval_results.json) rewrites config.yaml with
    # MODEL.WEIGHTS = its model_final.pth: still the same run.
    copy = tmp_path / "evaluated"
    copy.mkdir()
    cfg = yaml.safe_load((root / "baseline_seed0" / "config.yaml").read_text())
    cfg["MODEL"]["WEIGHTS"] = str(copy / "model_final.pth")
    cfg["OUTPUT_DIR"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    evaluated = demo.Run("baseline", baseline.config_file, str(copy), baseline.opts[:-2], baseline.test_images)
    assert evaluated.config_changes() == []


def test_demo_seeds_quick_writes_three_seed_rows(quick_demo, tmp_path, monkeypatch, results_dir_untouched, load_script):
    """Reuses the teacher and seed 0 of the demo's runs; trains seeds 1 and 2."""
    root, _ = quick_demo
    monkeypatch.chdir(REPO)
    output = tmp_path / "demo_seeds.md"
    demo_seeds = load_script("demo_seeds")
    assert demo_seeds.main(["--quick", "--output-root", str(root), "--output", str(output)]) == str(output)
    text = output.read_text()
    seed_rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |", "| 2 |"))]
    assert len(seed_rows) == 3 and all(len(r.strip("|").split("|")) == 10 for r in seed_rows)
    assert "| mean ± std |" in text and "python benchmarks/demo_seeds.py --quick" in text
    for seed in (1, 2):
        assert (root / f"baseline_seed{seed}" / "eval_results.json").is_file()
        assert (root / f"distilled_seed{seed}" / "eval_results.json").is_file()
    with pytest.raises(SystemExit, match="benchmarks/results"):
        demo_seeds.main(["--quick", "--output-root", str(root), "--output",
                         os.path.join(REPO, "benchmarks", "results", "demo_seeds.md")])
