"""
The accuracy study's report (study.accuracy_report and the tables it draws: loss balance,
detector fit, per-class AP, balanced against paper weights), pinned with hand-computed numbers.
"""

import json
import math

import pytest

from study import (
    balanced_lines,
    detector_fit,
    loss_balance,
    other_cpu_runs,
    other_teacher_runs,
    per_class_keys,
    per_class_lines,
    render_chart,
    render_markdown,
    summarize,
)


def test_summary_mean_std_gain_and_gap_closed_by_hand(tmp_path):
    def run(method, seed, ap, ap50, ap75):
        return {"method": method, "seed": seed, "iterations": 600, "metrics": {"AP": ap, "AP50": ap50, "AP75": ap75}}

    runs = [
        run("teacher", 42, 50.0, 80.0, 60.0),
        run("baseline", 0, 30.0, 60.0, 30.0),
        run("baseline", 1, 34.0, 64.0, 36.0),
        run("m", 0, 40.0, 70.0, 40.0),
        run("m", 1, 42.0, 70.0, 44.0),
        run("worse", 0, 20.0, None, 10.0),
    ]
    s = summarize(runs)
    assert list(s) == ["teacher", "baseline", "m", "worse"]
    # baseline: mean 32, sample std sqrt(((30-32)^2 + (34-32)^2) / 1) = sqrt(8)
    assert s["baseline"]["AP"] == pytest.approx(32.0) and s["baseline"]["AP_std"] == pytest.approx(math.sqrt(8))
    # m: mean 41, std sqrt(2); gain 41 - 32 = 9; gap closed 9 / (50 - 32) = 0.5
    m = s["m"]
    assert (m["n"], m["AP"], m["AP_std"]) == (2, pytest.approx(41.0), pytest.approx(math.sqrt(2)))
    assert m["AP_gain"] == pytest.approx(9.0) and m["AP_gap_closed"] == pytest.approx(0.5)
    # AP75: m 42 vs baseline 33 vs teacher 60 -> gap closed 9 / 27
    assert m["AP75_gap_closed"] == pytest.approx(1 / 3)
    # one seed: no std; a metric that could not be computed stays None
    assert (
        s["worse"]["AP_std"] is None
        and s["worse"]["AP50"] is None
        and s["worse"]["AP_gap_closed"] == pytest.approx(-12 / 18)
    )
    assert s["teacher"]["AP_gain"] is None

    results = {
        "split": "test",
        "train_dataset": "bccd_trainval",
        "test_dataset": "bccd_test",
        "runs": runs,
        "invocations": [{"command": "python benchmarks/accuracy.py --seeds 0 1", "date": "d"}]
        + [{"command": f"python benchmarks/accuracy.py --methods m --seeds {i}", "date": "d"} for i in range(12)],
    }
    md = render_markdown(results)
    # every invocation is listed, the first (which made the teacher and baseline rows) too
    made_by = md.split("Made by:")[1]
    assert made_by.count("python benchmarks/accuracy.py") == 13
    row = next(line for line in md.splitlines() if line.startswith("| m |"))
    assert row.split(" | ")[1:7] == ["2", "41.0 ± 1.4", "70.0 ± 0.0", "42.0 ± 2.8", "+9.0", "50%"]
    assert row.rstrip(" |").split(" | ")[-2:] == ["+9.0 ± 1.4 (2)", "s0 40.0, s1 42.0"]
    assert s["baseline"]["AP_per_seed"] == [(0, 30.0), (1, 34.0)]
    # paired by seed: m - baseline = 40 - 30 = 10 (s0), 42 - 34 = 8 (s1) -> 9 ± sqrt(2);
    # worse has only seed 0: 20 - 30 = -10, one pair, no std
    assert (m["AP_paired_gain"], m["AP_paired_gain_std"], m["AP_paired_n"]) == (
        pytest.approx(9.0), pytest.approx(math.sqrt(2)), 2)
    assert (s["worse"]["AP_paired_gain"], s["worse"]["AP_paired_gain_std"]) == (pytest.approx(-10.0), None)
    assert s["baseline"]["AP_paired_n"] == 0 and s["teacher"]["AP_paired_n"] == 0
    assert "python benchmarks/accuracy.py --seeds 0 1" in md
    png = render_chart(results, str(tmp_path / "chart.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_loss_balance_reads_the_multipliers_and_never_sums_them_as_losses(tmp_path):
    """A run with DISTILL.LOSS_BALANCE logs `distill_balance/<head>`: the table shows it as the head's multiplier
    (mean over seeds); grouped metric names (`a/b`, even starting with `loss_`) are never summed as losses."""
    lines = [
        {"iteration": 0, "loss_cls": 1.0, "loss_kd_kd_cls": 0.2, "distill_balance/kd": 1.0, "loss_x/y": 9.0},
        {"iteration": 1, "loss_cls": 0.5, "loss_kd_kd_cls": 0.5, "distill_balance/kd": 2.5, "loss_x/y": 9.0},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines))
    balance = loss_balance(str(tmp_path), fraction=0.5)
    assert balance["start"]["detector"] == 1.0 and balance["end"]["detector"] == 0.5
    assert balance["end"]["distill"] == 0.5 and balance["multipliers"] == {"kd": 2.5}
    other = dict(balance, multipliers={"kd": 3.5})
    runs = [
        {"method": "kd_bal", "seed": s, "kind": "distill", "iterations": 2, "loss_balance": b,
         "metrics": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}}
        for s, b in ((0, balance), (1, other))
    ]
    md = render_markdown({"split": "val", "runs": runs, "invocations": []})
    row = next(line for line in md.splitlines() if line.startswith("| kd_bal | 2 | 1 | "))  # det. start 1
    assert row.rstrip(" |").split(" | ")[-1] == "kd 3"  # (2.5 + 3.5) / 2
    assert "multiplier" in md


def test_loss_balance_from_metrics_json_by_hand(tmp_path):
    """First/last 10% of the iterations with distillation on; a resumed run's repeats count once."""
    lines = []
    for it in range(20):  # distillation off (warm-up) for iterations 0..9
        kd = 0.0 if it < 10 else 0.1 * it
        lines.append({"iteration": it, "loss_cls": 1.0, "loss_box_reg": 0.5, "loss_kd_fitnet_p2": kd, "lr": 0.02})
    lines.append({"iteration": 19, "bbox/AP": 30.0})  # an evaluation record
    lines.append({"iteration": 19, "loss_cls": 2.0, "loss_box_reg": 1.0, "loss_kd_fitnet_p2": 3.0})  # resumed
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")
    balance = loss_balance(str(tmp_path))
    # 10 active iterations (10..19) -> windows of 1: iteration 10 and iteration 19 (last record)
    assert balance["start"] == {"detector": 1.5, "distill": pytest.approx(1.0), "ratio": pytest.approx(1 / 1.5),
                                "iterations": [10, 10]}
    assert balance["end"] == {"detector": 3.0, "distill": 3.0, "ratio": 1.0, "iterations": [19, 19]}
    # a window of 2: iterations 10, 11 -> detector 1.5, distill (1.0 + 1.1) / 2
    two = loss_balance(str(tmp_path), fraction=0.2)
    assert two["start"]["distill"] == pytest.approx(1.05) and two["start"]["iterations"] == [10, 11]
    assert loss_balance(str(tmp_path / "missing")) is None

    runs = [
        {"method": "fitnet", "seed": s, "kind": "distill", "iterations": 20, "loss_balance": balance,
         "metrics": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}}
        for s in (0, 1)
    ]
    md = render_markdown({"split": "test", "runs": runs, "invocations": []})
    row = next(line for line in md.splitlines() if line.startswith("| fitnet | 2 | 1.5"))
    assert row.rstrip(" |").split(" | ")[1:8] == ["2", "1.5", "1", "0.667", "3", "3", "1"]


def test_detector_fit_from_metrics_json_by_hand(tmp_path):
    """Means of the detector's own losses and foreground accuracy over the whole run and its last
    10%, warm-up included; the report pairs each distilled run with the baseline of its seed."""
    def write(folder, fg, box):
        folder.mkdir()
        lines = [{"iteration": it, "loss_cls": 0.5, "loss_box_reg": box(it), "fast_rcnn/fg_cls_accuracy": fg(it),
                  "loss_rpn_cls": box(it) / 5, "loss_kd_kd": 1.0, "lr": 0.02} for it in range(20)]
        lines.append({"iteration": 20, "bbox/AP": 50.0})  # an evaluation record
        (folder / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines))
        return detector_fit(str(folder))

    base = write(tmp_path / "b", fg=lambda it: it / 20, box=lambda it: 1.0)
    # fg accuracy 0, 0.05, ..., 0.95: mean 0.475; the last 2 (18, 19): 0.925
    assert base["run"] == {"loss_cls": 0.5, "loss_box_reg": 1.0, "fast_rcnn/fg_cls_accuracy": pytest.approx(0.475),
                           "loss_rpn_cls": pytest.approx(0.2), "iterations": [0, 19]}
    assert base["end"] == {"loss_cls": 0.5, "loss_box_reg": 1.0, "fast_rcnn/fg_cls_accuracy": pytest.approx(0.925),
                           "loss_rpn_cls": pytest.approx(0.2), "iterations": [18, 19]}
    slow = write(tmp_path / "s", fg=lambda it: it / 40, box=lambda it: 1.0 + it / 10)
    # fg: half the baseline's (0.2375 run, 0.4625 end); box: 1 + mean(0..19)/10 = 1.95 run, 1 + 18.5/10 = 2.85 end
    assert slow["run"]["loss_box_reg"] == pytest.approx(1.95) and slow["end"]["loss_box_reg"] == pytest.approx(2.85)
    assert detector_fit(str(tmp_path / "missing")) is None

    def run(method, seed, kind, fit):
        return {"method": method, "seed": seed, "kind": kind, "iterations": 20, "detector_fit": fit,
                "metrics": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}}

    runs = [run("baseline", 0, "baseline", base), run("baseline", 1, "baseline", slow), run("kd", 0, "distill", slow),
            run("kd", 2, "distill", slow)]  # kd seed 2 has no baseline: not paired
    md = render_markdown({"split": "test", "runs": runs, "invocations": []})
    baseline_row = next(line for line in md.splitlines() if line.startswith("| **baseline** | 2 | 0."))
    # baseline mean over its seeds: fg run (0.475 + 0.2375) / 2, fg end (0.925 + 0.4625) / 2, cls 0.5,
    # box run (1 + 1.95) / 2, box end (1 + 2.85) / 2, RPN cls end box end / 5: (0.2 + 0.57) / 2
    assert baseline_row.rstrip(" |").split(" | ")[1:] == ["2", "0.356", "0.694", "0.500", "0.500", "1.475", "1.925",
                                                           "0.385"]
    kd_row = next(line for line in md.splitlines() if line.startswith("| kd | 1 | -"))
    assert kd_row.rstrip(" |").split(" | ")[1:] == ["1", "-0.237", "-0.463", "+0.000", "+0.000", "+0.950", "+1.850",
                                                    "+0.370"]


def test_per_class_table_pairs_each_class_by_seed():
    """The report's per-class table: teacher and baseline means per class, their gap, and each
    method's per-class gain paired with the baseline of its seed (a seed without one is left out)."""
    def run(method, seed, kind, platelets, rbc, small):
        return {"method": method, "seed": seed, "kind": kind, "iterations": 20,
                "metrics": {"AP": 1.0, "AP50": 2.0, "AP75": 0.5, "AP-Platelets": platelets, "AP-RBC": rbc, "APs": small}}

    runs = [run("teacher", 42, "teacher", 51.0, 57.0, 48.0),
            run("baseline", 0, "baseline", 36.0, 53.0, 16.0), run("baseline", 1, "baseline", 33.0, 53.5, 15.0),
            run("cwd", 0, "distill", 22.0, 54.5, 8.0), run("cwd", 1, "distill", 21.0, 54.0, 11.0),
            run("cwd", 2, "distill", 99.0, 99.0, 99.0)]
    assert per_class_keys(runs) == ["AP-Platelets", "AP-RBC", "APs"]
    lines = per_class_lines(runs)
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").split(" | ")[1:] for line in "\n".join(lines).splitlines() if line.startswith("| ")}
    assert rows["Method"] == ["pairs", "Platelets", "RBC", "APs"]
    assert rows["**teacher**"] == ["1", "51.0", "57.0", "48.0"]
    assert rows["**baseline**"] == ["2", "34.5", "53.2", "15.5"]  # 53.25 rounds to even
    assert rows["gap (teacher − baseline)"] == ["–", "+16.5", "+3.8", "+32.5"]
    # Platelets: 22 - 36 = -14, 21 - 33 = -12 -> -13 +- sqrt(2); RBC +1.5, +0.5 -> +1.0 +- 0.7; APs -8, -4 -> -6 +- 2.8
    assert rows["cwd"] == ["2", "-13.0 ± 1.4", "+1.0 ± 0.7", "-6.0 ± 2.8"]
    md = render_markdown({"split": "val", "runs": runs, "invocations": []})
    assert "| cwd | 2 | -13.0 ± 1.4 | +1.0 ± 0.7 | -6.0 ± 2.8 |" in md
    no_classes = [dict(e, metrics={"AP": 1.0}) for e in runs]
    assert per_class_lines(no_classes) == [] and per_class_lines([e for e in runs if e["kind"] != "baseline"]) == []


def test_runs_distilled_from_another_teacher_are_listed(tmp_path):
    """A distillation run whose own evaluation of its teacher (teacher_metrics) differs from the
    teacher row by more than 0.05 AP was distilled from other weights: the report says which."""

    def run(method, seed, ap, teacher_ap=None, kind="distill"):
        entry = {"method": method, "seed": seed, "kind": kind, "iterations": 600, "metrics": {"AP": ap}}
        if teacher_ap is not None:
            entry["teacher_metrics"] = {"AP": teacher_ap}
        return entry

    runs = [
        run("teacher", 42, 60.6114, kind="teacher"),
        run("baseline", 0, 57.7, kind="baseline"),
        run("kd", 0, 59.0, teacher_ap=60.6114),
        run("kd", 1, 58.9, teacher_ap=60.65),  # 0.04 apart: the same teacher
        run("gkd", 0, 58.0, teacher_ap=60.1809),  # 0.43 apart: a retrained teacher
        run("fbkd", 0, 58.1, teacher_ap=61.0),
        run("old", 0, 58.2),  # recorded before teacher_metrics existed: unknown, not listed
    ]
    assert other_teacher_runs(runs) == [("fbkd", 0, 61.0), ("gkd", 0, 60.1809)]
    md = render_markdown({"runs": runs})
    assert "fbkd s0 (teacher AP 61.0), gkd s0 (teacher AP 60.2)" in md
    same = [r for r in runs if r["method"] not in ("gkd", "fbkd")]
    assert other_teacher_runs(same) == [] and "other teacher weights" not in render_markdown({"runs": same})
    assert other_teacher_runs(runs[1:]) == []  # no teacher row: nothing to compare with


def test_runs_on_another_cpu_kind_than_their_baseline_are_listed():
    """A from-scratch run did not repeat across CPU kinds here (the val teacher: 57.7 vs 58.6 AP),
    so a distillation run trained on another CPU than the baseline of its seed is named."""

    def run(method, seed, cpu, kind="distill"):
        entry = {"method": method, "seed": seed, "kind": kind, "iterations": 600, "metrics": {"AP": 57.0}}
        if cpu is not None:
            entry["cpu"] = cpu
        return entry

    amd, intel = "AMD EPYC", "Intel(R) Xeon(R) Processor"
    runs = [
        run("teacher", 42, intel, kind="teacher"),  # the teacher is not paired with a baseline
        run("baseline", 0, amd, kind="baseline"),
        run("baseline", 1, intel, kind="baseline"),
        run("cwd", 0, intel),  # other CPU than baseline s0
        run("cwd", 1, intel),  # same as baseline s1
        run("kd", 0, amd),
        run("kd", 2, intel),  # no baseline of seed 2
        run("fgd", 0, None),  # recorded before cpu existed: unknown, not listed
    ]
    assert other_cpu_runs(runs) == [("cwd", 0, intel, amd)]
    md = render_markdown({"runs": runs})
    assert "another CPU kind than the baseline run of their seed: cwd s0 (Intel(R) Xeon(R) Processor; " \
        "baseline AMD EPYC)." in md
    same = [r for r in runs if r["method"] != "cwd"]
    assert other_cpu_runs(same) == [] and "another CPU kind" not in render_markdown({"runs": same})


def test_balanced_runs_are_paired_with_the_paper_weight_runs_by_hand():
    def run(method, seed, ap, multiplier=None):
        entry = {"method": method, "seed": seed, "kind": "distill", "iterations": 300, "metrics": {"AP": ap}}
        if multiplier is not None:
            scales = {"detector": 1.0, "distill": 0.5, "ratio": 0.5}
            entry["loss_balance"] = {"start": scales, "end": scales,
                                     "multipliers": {method[: -len("_balanced")]: multiplier}}
        return entry

    runs = [run("kd", 0, 53.0), run("kd", 1, 51.0), run("kd", 2, 50.0),
            run("kd_balanced", 0, 55.0, 1.41), run("kd_balanced", 1, 52.0, 1.39),
            run("cwd_balanced", 0, 45.0, 0.03),  # no paper-weight cwd run: no row
            {"method": "baseline", "seed": 0, "kind": "baseline", "iterations": 300, "metrics": {"AP": 1.0}}]
    lines = balanced_lines(runs)
    rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| ") and not line.startswith("| Preset")]
    # seeds 0 and 1 shared; paper mean (53 + 51) / 2 = 52, balanced 53.5; differences +2, +1: +1.5 +- sqrt(0.5)
    assert rows == ["| kd | s0, s1 | 52.0 | 53.5 | +1.5 ± 0.7 | 1.41, 1.39 |"]
    assert rows[0] in render_markdown({"split": "test", "runs": runs, "invocations": []})
    assert balanced_lines([e for e in runs if e["method"] != "kd"]) == []
