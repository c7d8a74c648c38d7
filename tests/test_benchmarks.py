"""
Benchmark scripts (issue 7): their --quick modes run end to end, in-process, writing only
under tmp_path; the study's bookkeeping (method discovery, statistics, resume decisions,
schedule scaling) is pinned with hand-computed numbers.
"""

import importlib.util
import json
import math
import os
import re
import subprocess

import pytest

from conftest import REPO

from d2kd.benchmark import (
    detector_fit,
    discover_methods,
    load_cfg,
    loss_balance,
    merge_opts,
    other_cpu_runs,
    other_teacher_runs,
    per_class_keys,
    per_class_lines,
    render_chart,
    render_markdown,
    select_names,
    split_method_pattern,
    study_methods,
    summarize,
)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"d2kd_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accuracy():
    return _load_tool("benchmark_accuracy")


@pytest.fixture
def results_dir_untouched():
    """The quick modes must never write into benchmarks/results."""
    folder = os.path.join(REPO, "benchmarks", "results")

    def snapshot():
        return (
            {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder)} if os.path.isdir(folder) else {}
        )

    before = snapshot()
    yield
    assert snapshot() == before, "a quick benchmark wrote into benchmarks/results"


# ----------------------------------------------------------------------------- bookkeeping


def test_methods_are_discovered_from_config_files(tmp_path):
    for name in (
        "distill_fitnet_R50_R18.yaml",
        "distill_fbkd_paper_R50_R18.yaml",
        "student_R18_FPN.yaml",
        "distill_kd_R50_R101.yaml",
    ):
        (tmp_path / name).write_text("_BASE_: x\n")
    found = discover_methods(str(tmp_path))
    assert list(found) == ["fbkd_paper", "fitnet"]
    assert found["fitnet"] == os.path.join(str(tmp_path), "distill_fitnet_R50_R18.yaml")
    # The repository's configs: whatever files exist now, at least the foundation's two.
    repo = discover_methods()
    assert {"fitnet", "kd"} <= set(repo)
    assert all(os.path.isfile(os.path.join(REPO, p)) for p in repo.values())
    assert select_names(["kd"], list(repo)) == ["kd"]
    with pytest.raises(SystemExit, match=r"Unknown method.*\['nope'\].*fitnet"):
        select_names(["nope"], list(repo))


def test_study_keeps_only_methods_of_its_student_and_teacher(tmp_path):
    from d2kd.benchmark import study_methods

    base = os.path.join(REPO, "configs", "bccd", "distill_fitnet_R50_R18.yaml")
    variants = {
        "same": "",
        "other_teacher": "DISTILL:\n  TEACHER:\n    CONFIG_FILE: configs/bccd/retinanet_R50_FPN_teacher.yaml\n",
        "deeper_student": "MODEL:\n  RESNETS:\n    DEPTH: 34\n",
        "no_heads": "DISTILL:\n  HEADS: []\n",
        "inherit_only": "DISTILL:\n  HEADS: []\n  INHERIT:\n    ENABLED: True\n",
    }
    methods = {}
    for name, extra in variants.items():
        path = tmp_path / f"distill_{name}_R50_R18.yaml"
        path.write_text(f"_BASE_: {base}\n{extra}")
        methods[name] = str(path)
    kept, skipped = study_methods(
        methods, os.path.join(REPO, "configs/bccd/student_R18_FPN.yaml"), "./configs/bccd/teacher_R50_FPN.yaml"
    )
    assert list(kept) == ["same", "inherit_only"]
    assert "retinanet_R50_FPN_teacher" in skipped["other_teacher"] and "34" in skipped["deeper_student"]
    assert skipped["no_heads"] == "no DISTILL.HEADS, no DISTILL.INHERIT"


def test_command_string_carries_the_speed_relevant_environment(monkeypatch):
    from d2kd.benchmark import command_string

    for k in list(os.environ):
        if k.startswith("MALLOC_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(k)
    assert command_string("tools/x.py", ["--methods", "a b"]) == "python tools/x.py --methods 'a b'"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("UNRELATED", "1")
    assert (
        command_string("tools/x.py", ["--seeds", "0"])
        == "MALLOC_TRIM_THRESHOLD_=68719476736 OMP_NUM_THREADS=1 python tools/x.py --seeds 0"
    )


class _Fatal(Exception):
    pass


def _scheduled(tasks, max_parallel, teacher_error=None):
    """Run named tasks ("T" teacher, "B*" baselines, "D*" depend on T) through the scheduler."""
    import threading

    from d2kd.benchmark import run_with_dependencies

    lock, log, active, peak = threading.Lock(), [], [0], [0]
    together = threading.Barrier(2, timeout=20)  # T and B0 must be running at the same time

    def run(task):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            log.append(("start", task))
        if max_parallel > 1 and task in ("T", "B0"):
            together.wait()
        with lock:
            active[0] -= 1
            log.append(("end", task))
        if task == "T" and teacher_error is not None:
            raise teacher_error
        return task.lower()

    seen = []
    outcome = run_with_dependencies(
        tasks,
        run,
        max_parallel,
        key=lambda t: t,
        depends_on=lambda t: ["T"] if t.startswith("D") else [],
        on_success=lambda t, result: seen.append((t, result)),
        on_failure=lambda t, error: seen.append((t, type(error).__name__)),
        failure_types=(ValueError,),
    )
    return outcome, log, peak[0], seen


def test_scheduler_runs_side_by_side_after_dependencies():
    outcome, log, peak, seen = _scheduled(["T", "B0", "B1", "D0", "D1"], 2)
    assert peak == 2 and sorted(outcome["succeeded"]) == ["B0", "B1", "D0", "D1", "T"]
    assert outcome["failed"] == [] and outcome["blocked"] == []
    assert log.index(("start", "D0")) > log.index(("end", "T")) and ("D0", "d0") in seen
    # One at a time: list order.
    outcome, log, peak, _ = _scheduled(["T", "B0", "D0"], 1)
    assert peak == 1 and [e for e in log if e[0] == "start"] == [("start", t) for t in ("T", "B0", "D0")]


def test_scheduler_failure_blocks_dependants_and_fatal_errors_propagate():
    outcome, log, _, seen = _scheduled(["T", "B0", "B1", "D0", "D1"], 2, teacher_error=ValueError("no teacher"))
    assert outcome["failed"] == ["T"] and outcome["blocked"] == ["D0", "D1"]
    assert sorted(outcome["succeeded"]) == ["B0", "B1"] and ("T", "ValueError") in seen
    assert ("start", "D0") not in log and ("start", "D1") not in log
    with pytest.raises(_Fatal):
        _scheduled(["T", "B0", "B1", "D0"], 2, teacher_error=_Fatal())
    with pytest.raises(ValueError, match="max_parallel"):
        _scheduled(["T"], 0)


def test_merge_opts_keeps_the_last_value_of_a_key():
    assert merge_opts(["A", "1", "B", 2], ["A", "3"], [], ["C", "x"]) == ["A", "3", "B", "2", "C", "x"]
    with pytest.raises(ValueError, match="KEY VALUE"):
        merge_opts(["A"])


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
        "invocations": [{"command": "python tools/benchmark_accuracy.py --seeds 0 1", "date": "d"}]
        + [{"command": f"python tools/benchmark_accuracy.py --methods m --seeds {i}", "date": "d"} for i in range(12)],
    }
    md = render_markdown(results)
    # every invocation is listed, the first (which made the teacher and baseline rows) too
    made_by = md.split("Made by:")[1]
    assert made_by.count("python tools/benchmark_accuracy.py") == 13
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
    assert "python tools/benchmark_accuracy.py --seeds 0 1" in md
    png = render_chart(results, str(tmp_path / "chart.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


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


def test_loss_balance_keeps_weight_regularisers_apart(tmp_path, accuracy):
    """HGD's learned-weight term trains only the weights: not in ``distill``, reported as ``regularizer``;
    a rebuilt report re-reads the balance only from a directory that still holds the run."""
    lines = [{"iteration": it, "loss_cls": 1.0, "loss_kd_hgd_p2": 0.5 + it, "loss_kd_hgd_logvar": -0.25 * it}
             for it in range(10)]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines + [{"iteration": 10, "bbox/AP": 1.0}]))
    balance = loss_balance(str(tmp_path))  # windows of 1: iterations 0 and 9
    assert balance["start"] == {"detector": 1.0, "distill": 0.5, "ratio": 0.5, "iterations": [0, 0], "regularizer": 0.0}
    assert balance["end"] == {"detector": 1.0, "distill": 9.5, "ratio": 9.5, "iterations": [9, 9], "regularizer": -2.25}
    entry = {"output_dir": str(tmp_path), "iterations": 10}
    assert accuracy._same_schedule(entry)  # the evaluation record (iteration 10) is not a training record
    assert not accuracy._same_schedule(dict(entry, iterations=600))
    assert not accuracy._same_schedule(dict(entry, output_dir=str(tmp_path / "gone")))


def test_baselines_imported_from_another_study_pair_by_seed(tmp_path, accuracy):
    """--baseline-from: the seeds a variants study lacks come from the main study's baselines,
    so its runs pair by seed; another run design is refused, naming the field."""
    design = {"config": "configs/bccd/student_R18_FPN.yaml", "config_sha1": "abc", "iterations": 600,
              "train_dataset": "bccd_trainval", "test_dataset": "bccd_test"}

    def run(method, seed, ap, kind, **extra):
        return {"method": method, "seed": seed, "kind": kind, "metrics": {"AP": ap, "AP50": 90.0, "AP75": 65.0},
                **(design if kind == "baseline" else {}), **extra}

    main = tmp_path / "main.json"
    main.write_text(json.dumps({"runs": [run("baseline", s, ap, "baseline") for s, ap in ((0, 50.0), (1, 52.0), (2, 51.0))]}))
    results = {"test_dataset": "bccd_test",
               "runs": [run("baseline", 0, 50.0, "baseline"), run("variant", 0, 53.0, "distill"), run("variant", 1, 51.0, "distill")]}
    store = accuracy.ResultsFile(str(tmp_path / "variants.json"), results)
    assert accuracy.import_baselines(results, store, str(main), design["config"]) == [1, 2]
    baselines = {e["seed"]: e for e in results["runs"] if e["kind"] == "baseline"}
    assert sorted(baselines) == [0, 1, 2] and "imported_from" not in baselines[0]
    assert baselines[1]["imported_from"] == str(main) and baselines[1]["metrics"]["AP"] == 52.0
    row = summarize(results["runs"])["variant"]
    # pairs: seed 0: 53 - 50 = +3, seed 1: 51 - 52 = -1 -> mean +1, sample std sqrt(8) = 2.83
    assert row["AP_paired_n"] == 2 and row["AP_paired_gain"] == pytest.approx(1.0)
    assert row["AP_paired_gain_std"] == pytest.approx(math.sqrt(8))
    assert accuracy.import_baselines(results, store, str(main), design["config"]) == []  # nothing left to copy

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [dict(run("baseline", 3, 49.0, "baseline"), iterations=300)]}))
    with pytest.raises(SystemExit, match="iterations 300 != 600"):
        accuracy.import_baselines(results, store, str(other), design["config"])


def test_copied_baselines_from_another_cpu_kind_are_warned_about(accuracy):
    """--baseline-from copying baselines trained on another CPU kind than this machine warns,
    naming the seeds and CPUs and how to train the baseline here instead."""
    runs = [
        {"method": "baseline", "seed": 0, "kind": "baseline", "cpu": "AMD EPYC"},
        {"method": "baseline", "seed": 1, "kind": "baseline", "cpu": "Intel Xeon"},
        {"method": "baseline", "seed": 2, "kind": "baseline"},  # no cpu recorded: unknown
        {"method": "cwd", "seed": 0, "kind": "distill", "cpu": "AMD EPYC"},
    ]
    message = accuracy.baselines_from_another_cpu({"runs": runs}, [0, 1, 2], "Intel Xeon")
    assert message.startswith("WARNING") and "seed 0 on AMD EPYC" in message and "seed 1" not in message
    assert "this machine (Intel Xeon)" in message and "--force" in message
    assert accuracy.baselines_from_another_cpu({"runs": runs}, [1, 2], "Intel Xeon") is None
    assert accuracy.baselines_from_another_cpu({"runs": runs}, [], "Intel Xeon") is None


def test_schedule_override_scales_steps_and_distill_delays(accuracy):
    from d2kd.benchmark import load_cfg

    cfg = load_cfg(os.path.join(REPO, "configs/bccd/distill_fitnet_R50_R18.yaml"))
    cfg.merge_from_list(["DISTILL.WARMUP_ITERS", 60, "DISTILL.STOP_ITER", 540])
    # 600 iterations, steps (450, 550), warm-up 100, checkpoints every 200 -> 300 iterations
    opts = accuracy.scale_schedule_opts(cfg, 300)
    got = dict(zip(opts[0::2], opts[1::2]))
    assert got == {
        "SOLVER.MAX_ITER": "300",
        "SOLVER.STEPS": "(225, 275)",
        "SOLVER.WARMUP_ITERS": "50",
        "SOLVER.CHECKPOINT_PERIOD": "100",
        "DISTILL.WARMUP_ITERS": "30",
        "DISTILL.STOP_ITER": "270",
    }
    assert accuracy.scale_schedule_opts(cfg, None) == [] and accuracy.scale_schedule_opts(cfg, 600) == []


def test_run_folder_decides_harvest_resume_or_train(accuracy, tmp_path):
    plan = lambda **kw: accuracy.plan_action(str(tmp_path), 10, "bccd_test", 0, **kw)[0]  # noqa: E731
    assert plan() == "train"
    (tmp_path / "config.yaml").write_text("SEED: 0\nSOLVER: {MAX_ITER: 10}\nDATASETS: {TEST: [bccd_test]}\n")
    assert plan() == "train"
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    assert plan() == "resume"
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "eval_results.json").write_text("{}")
    os.utime(tmp_path / "model_final.pth", (1000, 1000))
    assert plan() == "harvest"
    assert plan(force=True) == "train"
    # evaluation older than the weights: evaluate again by resuming (which only evaluates)
    os.utime(tmp_path / "eval_results.json", (10, 10))
    assert plan() == "resume"
    # another schedule or seed in the folder: start over
    assert accuracy.plan_action(str(tmp_path), 20, "bccd_test", 0)[0] == "train"
    assert accuracy.plan_action(str(tmp_path), 10, "bccd_test", 1)[0] == "train"
    assert accuracy.plan_action(str(tmp_path), 10, "bccd_val", 0)[0] == "train"


def test_harvested_run_is_recorded_with_its_training_provenance_and_wall_time(accuracy, tmp_path, monkeypatch):
    """
    A run that finished after its study process had gone is harvested later: its entry takes the
    commit, threads and command from the run folder (written when the run started), not from the
    harvesting invocation, and its wall time from file times.
    """
    fake_git = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(accuracy, "git_info", lambda: fake_git)
    out = str(tmp_path / "run")
    os.makedirs(out)
    job = accuracy.Job("baseline", 1, "baseline", "configs/bccd/student_R18_FPN.yaml", [], out, 600, action="train")
    job.extra.update(threads=1, parallel_jobs=2, invocation="python tools/benchmark_accuracy.py --jobs 2")
    accuracy.note_run_start(job, start=1000.0)
    job.action = "resume"  # a resume appends; the wall time counts from the first start
    accuracy.note_run_start(job, start=1500.0)
    (tmp_path / "run" / "eval_results.json").write_text(json.dumps({"bbox": {"AP": 57.0, "AP50": 90.0, "AP75": 65.0}}))
    os.utime(os.path.join(out, "eval_results.json"), (4600.0, 4600.0))
    found = accuracy.run_provenance(out)
    assert found["wall_time_s"] == 3600.0 and "bench_job.json" in found["wall_time_source"]
    assert found["run_threads"] == 1 and found["parallel_jobs"] == 2 and found["git"] == fake_git
    assert found["benchmark_command"] == "python tools/benchmark_accuracy.py --jobs 2"

    # harvested by another invocation with other settings: the training run's values win
    fake_git = {"commit": "b" * 40, "dirty": True}
    monkeypatch.setattr(accuracy, "git_info", lambda: fake_git)
    harvest = accuracy.Job("baseline", 1, "baseline", job.config, [], out, 600, action="harvest")
    harvest.extra.update(threads=None)
    args = type("Args", (), {"in_process": False, "jobs": 1})()
    split = {"train": "bccd_trainval", "test": "bccd_test"}
    entry = accuracy.record_job(harvest, {}, args, split, "python tools/benchmark_accuracy.py", None, 0.0)
    assert entry["git"]["commit"] == "a" * 40 and entry["run_threads"] == 1 and entry["parallel_jobs"] == 2
    assert entry["wall_time_s"] == 3600.0 and entry["harvested_by"] == "python tools/benchmark_accuracy.py"
    assert entry["metrics"]["AP"] == 57.0
    # a run this invocation trained is recorded with the commit it started from, not today's HEAD
    job.action = "resume"
    entry = accuracy.record_job(job, {}, args, split, "python tools/benchmark_accuracy.py --jobs 2", 100.0, 50.0)
    assert entry["git"]["commit"] == "a" * 40 and entry["wall_time_s"] == 150.0

    # only a resume recorded (the run began before bench_job.json existed): the wall time says it is partial
    os.remove(os.path.join(out, "bench_job.json"))
    accuracy.note_run_start(job, start=4000.0)
    found = accuracy.run_provenance(out)
    assert found["wall_time_s"] == 600.0 and "earlier iterations not included" in found["wall_time_source"]

    # a folder the study never started: train_net's config.yaml marks the start
    os.remove(os.path.join(out, "bench_job.json"))
    (tmp_path / "run" / "config.yaml").write_text("SEED: 1\n")
    os.utime(os.path.join(out, "config.yaml"), (4000.0, 4000.0))
    found = accuracy.run_provenance(out)
    assert found == {"wall_time_s": 600.0, "wall_time_source": "file times: config.yaml to eval_results.json"}

    # a fresh "train" start forgets the previous run's starts
    job.action = "train"
    accuracy.note_run_start(job, start=5000.0)
    assert [s["started"] for s in json.load(open(os.path.join(out, "bench_job.json")))["starts"]] == [5000.0]


def test_results_file_keeps_the_runs_of_another_study_process(accuracy, tmp_path):
    """Two study processes writing one JSON file (each re-reads it before writing) keep each
    other's runs and invocations; a run of the same method and seed is replaced."""
    path = str(tmp_path / "study.json")

    def run(method, seed, ap):
        return {"method": method, "seed": seed, "metrics": {"AP": ap}}

    with open(path, "w") as f:
        json.dump({"benchmark": "b", "invocations": [{"command": "first"}], "runs": [run("baseline", 0, 50.0)]}, f)
    with open(path) as f:
        first = accuracy.ResultsFile(path, json.load(f))
    with open(path) as f:
        second = accuracy.ResultsFile(path, json.load(f))
    first.add_invocation({"command": "mine"})
    first.write()
    second.add_invocation({"command": "other"})
    second.add_run(run("kd", 0, 51.0))
    second.write()
    first.add_run(run("fgd", 1, 52.0))
    first.add_run(run("baseline", 0, 49.0))
    first.write()
    with open(path) as f:
        on_disk = json.load(f)
    assert {(r["method"], r["seed"]): r["metrics"]["AP"] for r in on_disk["runs"]} == {
        ("baseline", 0): 49.0, ("fgd", 1): 52.0, ("kd", 0): 51.0,
    }
    assert [r["method"] for r in on_disk["runs"]] == ["baseline", "fgd", "kd"]
    assert [i["command"] for i in on_disk["invocations"]] == ["first", "mine", "other"]
    assert first.results == on_disk and on_disk["benchmark"] == "b"


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


def test_teacher_weights_changed_since_the_teacher_row(accuracy, tmp_path):
    """The study warns when the teacher file it reuses is not the one its teacher row measured:
    by sha1 when recorded, else by a file written after the row's date."""
    import hashlib

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"teacher weights" * 100000)  # > one 1 MiB read block
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()
    assert accuracy._sha1(str(weights)) == digest and accuracy._sha1(str(tmp_path / "missing")) is None
    assert accuracy.teacher_changed_since_recorded({"weights_sha1": digest}, str(weights)) is None
    changed = accuracy.teacher_changed_since_recorded({"weights_sha1": "0" * 40}, str(weights))
    assert changed == f"sha1 {digest[:12]} is not the recorded 000000000000"
    # Older rows have no sha1: the file's time against the row's date (one minute's slack).
    os.utime(weights, (1_700_000_000, 1_700_000_000))  # 2023-11-14T22:13:20Z
    assert accuracy.teacher_changed_since_recorded({"date": "2023-11-14T22:13:00+00:00"}, str(weights)) is None
    later = accuracy.teacher_changed_since_recorded({"date": "2023-11-14T20:00:00+00:00"}, str(weights))
    assert later == "written 2023-11-14T22:13:20+00:00, after the teacher row was recorded (2023-11-14T20:00:00+00:00)"
    assert accuracy.teacher_changed_since_recorded({"date": "2023-11-14T20:00:00+00:00"}, str(tmp_path / "x")) is None


def test_git_info_ignores_the_benchmark_results_folder(tmp_path, monkeypatch):
    """The studies write benchmarks/results/ while they run; that must not mark their tree dirty."""
    from d2kd.benchmark import common

    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "study.json").write_text("{}\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(git + cmd, check=True)
    monkeypatch.setattr(common, "REPO_ROOT", str(repo))
    assert common.git_info()["dirty"] is False
    (repo / "benchmarks" / "results" / "study.json").write_text('{"runs": []}\n')
    assert common.git_info()["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert common.git_info()["dirty"] is True


def test_teacher_folder_written_recently_is_refused_until_idle(accuracy, tmp_path):
    """A teacher folder another run may be writing is never trained into; an idle one is resumed."""
    job = accuracy.Job("teacher", 0, "teacher", "configs/bccd/no_such_teacher.yaml", [], str(tmp_path), 10)
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}\n")
    with pytest.raises(SystemExit, match="resumes it from .* when metrics.json is 600 s old"):
        accuracy._refuse_if_busy(str(tmp_path), job, dry_run=False)
    accuracy._refuse_if_busy(str(tmp_path), job, dry_run=True)
    assert "WARNING: The teacher in" in job.reason
    old = metrics.stat().st_mtime - accuracy.TEACHER_BUSY_SECONDS - 1
    os.utime(metrics, (old, old))
    job.reason = ""
    assert accuracy._refuse_if_busy(str(tmp_path), job, dry_run=False) is None and job.reason == ""


def test_dry_run_plans_val_study_with_its_own_teacher(accuracy, tmp_path, capsys):
    code = accuracy.main(
        [
            "--dry-run",
            "--eval-split",
            "val",
            "--methods",
            "kd",
            "--seeds",
            "3",
            "--output-dir",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "w"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    teacher_dir = str(tmp_path / "w" / "bccd_accuracy_val" / "teacher")
    assert (
        "configs/bccd/teacher_R50_FPN.yaml --overwrite DATASETS.TRAIN '(\"bccd_train\",)' "
        f"DATASETS.TEST '(\"bccd_val\",)' OUTPUT_DIR {teacher_dir}" in out
    )
    assert f"SEED 3 DISTILL.TEACHER.WEIGHTS {teacher_dir}/model_final.pth" in out
    assert "bccd_test" not in out and not (tmp_path / "w").exists()
    assert not (tmp_path / "bccd_accuracy_val.json").exists()


def test_teacher_with_nothing_beside_it_gets_every_core(accuracy, tmp_path, capsys, monkeypatch):
    """--jobs 2 splits the cores between two runs, but a teacher trained with no baseline to run
    beside it (the distillation runs wait for it) gets them all."""
    monkeypatch.setattr(accuracy.os, "cpu_count", lambda: 4)
    common = ["--dry-run", "--eval-split", "val", "--methods", "kd", "--seeds", "3", "--jobs", "2"]
    common += ["--output-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]

    def planned_threads(extra):
        assert accuracy.main(common + extra) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if " iters" in line]
        return {re.match(r"\s*\d+\. (.+?)\s{2,}", line).group(1): line.rsplit("; ", 1)[1] for line in lines}

    assert planned_threads([]) == {"teacher": "2 threads", "baseline seed 3": "2 threads", "kd seed 3": "2 threads"}
    assert planned_threads(["--no-baseline"]) == {"teacher": "4 threads", "kd seed 3": "2 threads"}
    assert planned_threads(["--no-baseline", "--threads", "1"]) == {"teacher": "1 thread", "kd seed 3": "1 thread"}


def test_teacher_row_without_its_weights_is_trained_again_only_for_runs_that_need_it(accuracy, tmp_path, capsys):
    """On a new machine the results keep the teacher row but its weights are gone: the study
    trains them again when a distillation run needs them, keeps the recorded row, and skips
    the teacher when no run needs it."""
    work = tmp_path / "w"
    weights = str(work / "bccd_accuracy_val" / "teacher" / "model_final.pth")
    row = {"method": "teacher", "seed": 42, "kind": "teacher", "weights": weights, "metrics": {"AP": 60.0}}
    (tmp_path / "bccd_accuracy_val.json").write_text(json.dumps({"test_dataset": "bccd_val", "runs": [row]}))
    common = ["--dry-run", "--eval-split", "val", "--output-dir", str(tmp_path), "--work-dir", str(work)]
    assert accuracy.main(common + ["--methods", "kd", "--seeds", "3", "--no-baseline"]) == 0
    teacher_line = next(line for line in capsys.readouterr().out.splitlines() if "1. teacher" in line)
    assert "train    (in the results, but " + weights + " is missing: train it for the distillation runs" in (
        teacher_line
    )
    assert teacher_line.endswith("the recorded teacher row is kept); 1200 iters")

    kd = {"method": "kd", "seed": 3, "kind": "distill", "iterations": 600, "output_dir": str(work / "kd")}
    (tmp_path / "bccd_accuracy_val.json").write_text(json.dumps({"test_dataset": "bccd_val", "runs": [row, kd]}))
    assert accuracy.main(common + ["--methods", "kd", "--seeds", "3", "--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert f"1. teacher                  skip     (already in the results ({weights} is missing; no run here" in out
    assert json.loads((tmp_path / "bccd_accuracy_val.json").read_text())["runs"] == [row, kd]  # dry run: untouched


def _run_folder(folder, train_datasets):
    """A finished run's folder as Detectron2 leaves it: weights and the config.yaml it trained with."""
    folder.mkdir(parents=True)
    (folder / "model_final.pth").write_bytes(b"weights")
    trains = "".join(f"  - {d}\n" for d in train_datasets)
    (folder / "config.yaml").write_text(f"DATASETS:\n  TEST:\n  - bccd_test\n  TRAIN:\n{trains}SEED: 42\n")
    return str(folder / "model_final.pth")


def test_a_teacher_trained_on_the_validation_images_is_refused_for_tuning(accuracy, tmp_path):
    """--eval-split val tunes against bccd_val: a teacher trained on bccd_trainval (which holds
    every bccd_val image) would pass the validation labels to the students."""
    lists = os.path.join(REPO, "datasets", "bccd", "ImageSets", "Main")
    ids = {s: set(open(os.path.join(lists, f"{s}.txt")).read().split()) for s in ("train", "val", "trainval", "test")}
    assert ids["val"] <= ids["trainval"] and not ids["val"] & ids["train"] and not ids["test"] & ids["trainval"]
    n_val = len(ids["val"])

    trainval = _run_folder(tmp_path / "trainval_teacher", ["bccd_trainval"])
    assert accuracy.teacher_saw_eval_images(trainval, "bccd_val") == (
        f"the teacher weights {trainval} were trained on bccd_trainval (config.yaml beside them), "
        f"which holds {n_val} of the {n_val} bccd_val images this study evaluates on"
    )
    assert accuracy.teacher_saw_eval_images(trainval, "bccd_test") is None
    train = _run_folder(tmp_path / "train_teacher", ["bccd_train"])
    assert accuracy.teacher_saw_eval_images(train, "bccd_val") is None
    mixed = _run_folder(tmp_path / "mixed_teacher", ["bccd_train", "bccd_test"])
    assert f"trained on bccd_test (config.yaml beside them), which holds {len(ids['test'])} of the" in (
        accuracy.teacher_saw_eval_images(mixed, "bccd_test")
    )
    no_config = tmp_path / "downloaded" / "model_final.pth"
    no_config.parent.mkdir()
    no_config.write_bytes(b"weights")
    assert accuracy.teacher_saw_eval_images(str(no_config), "bccd_val") is None  # cannot be told

    # The study stops before planning anything, and says what to do instead.
    common = ["--dry-run", "--eval-split", "val", "--output-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="Drop --teacher-weights: the study then trains its own teacher on bccd_train"):
        accuracy.main(common + ["--methods", "kd", "--seeds", "0", "--teacher-weights", trainval])
    assert accuracy.main(common + ["--methods", "kd", "--seeds", "0", "--teacher-weights", train]) == 0
    assert not (tmp_path / "bccd_accuracy_val.json").exists()


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_validation_tuning_configs_change_only_their_setting():
    """configs/bccd/val_tuning: each variant is its preset with only the named settings changed (cwd and kd
    are the presets themselves; cwd_kd adds the kd head at kd's preset values, cwd_rpn the chen2017 head's RPN
    terms at the chen2017 preset's values; chen2017_no_hint and chen2017_hints split the chen2017
    preset into its output terms and its hints; chen2017_no_hint_mu0 and _nu1 double its soft labels or its
    bounded regression), and all belong to the Faster
    R-CNN R50 -> R18 study."""
    expected = {
        "cwd": ("distill_cwd_R50_R18.yaml", {}),
        "kd": ("distill_kd_R50_R18.yaml", {}),
        "cwd_w3": ("distill_cwd_R50_R18.yaml", {"DISTILL.CWD.WEIGHT": 3.0}),
        "cwd_w30": ("distill_cwd_R50_R18.yaml", {"DISTILL.CWD.WEIGHT": 30.0}),
        "cwd_no_p2": ("distill_cwd_R50_R18.yaml", {"DISTILL.CWD.IN_FEATURES": ["p3", "p4", "p5", "p6"]}),
        "cwd_warm100": ("distill_cwd_R50_R18.yaml", {"DISTILL.WARMUP_ITERS": 100}),
        "cwd_t4": ("distill_cwd_R50_R18.yaml", {"DISTILL.CWD.TAU": 4.0}),
        "cwd_kd": ("distill_cwd_R50_R18.yaml", {"DISTILL.HEADS": ["cwd", "kd"]}),
        "cwd_rpn": (
            "distill_cwd_R50_R18.yaml",
            {"DISTILL.HEADS": ["cwd", "chen2017"], "DISTILL.CHEN2017.STAGES": ["rpn"], "DISTILL.CHEN2017.HINT.ENABLED": False},
        ),
        "chen2017_rpn": (
            "distill_chen2017_R50_R18.yaml",
            {"DISTILL.CHEN2017.STAGES": ["rpn"], "DISTILL.CHEN2017.HINT.ENABLED": False},
        ),
        "chen2017_no_hint": ("distill_chen2017_R50_R18.yaml", {"DISTILL.CHEN2017.HINT.ENABLED": False}),
        "chen2017_no_hint_mu0": (
            "distill_chen2017_R50_R18.yaml",
            {"DISTILL.CHEN2017.HINT.ENABLED": False, "DISTILL.CHEN2017.CLS.MU": 0.0},
        ),
        "chen2017_no_hint_nu1": (
            "distill_chen2017_R50_R18.yaml",
            {"DISTILL.CHEN2017.HINT.ENABLED": False, "DISTILL.CHEN2017.REG.NU": 1.0},
        ),
        "chen2017_hints": (
            "distill_chen2017_R50_R18.yaml",
            {"DISTILL.CHEN2017.CLS.ENABLED": False, "DISTILL.CHEN2017.REG.ENABLED": False},
        ),
        "kd_w10": ("distill_kd_R50_R18.yaml", {"DISTILL.KD.WEIGHT": 10.0}),
        "kd_w5": ("distill_kd_R50_R18.yaml", {"DISTILL.KD.WEIGHT": 5.0}),
        "kd_t4": ("distill_kd_R50_R18.yaml", {"DISTILL.KD.TEMPERATURE": 4.0}),
        "kd_w10_cls_only": ("distill_kd_R50_R18.yaml", {"DISTILL.KD.WEIGHT": 10.0, "DISTILL.KD.CLASSIFIER_ONLY": True}),
    }
    found = discover_methods(*split_method_pattern("configs/bccd/val_tuning/{method}.yaml"))
    assert sorted(found) == sorted(expected)
    kept, skipped = study_methods(found, "configs/bccd/student_R18_FPN.yaml", "configs/bccd/teacher_R50_FPN.yaml")
    assert sorted(kept) == sorted(expected) and not skipped
    for name, (preset, changes) in expected.items():
        variant = _flat(load_cfg(found[name]))
        base = _flat(load_cfg(os.path.join(REPO, "configs", "bccd", preset)))
        differ = {k: variant[k] for k in variant if variant[k] != base.get(k)}
        assert differ == dict(changes, OUTPUT_DIR=f"output/bccd/val_tuning/{name}"), name
    kd = _flat(load_cfg(os.path.join(REPO, "configs", "bccd", "distill_kd_R50_R18.yaml")))
    cwd_kd = _flat(load_cfg(found["cwd_kd"]))
    assert {k: cwd_kd[k] for k in kd if k.startswith("DISTILL.KD.")} == {k: kd[k] for k in kd if k.startswith("DISTILL.KD.")}
    chen = _flat(load_cfg(found["chen2017_rpn"]))
    cwd_rpn = _flat(load_cfg(found["cwd_rpn"]))
    assert {k: cwd_rpn[k] for k in chen if k.startswith("DISTILL.CHEN2017.")} == {
        k: chen[k] for k in chen if k.startswith("DISTILL.CHEN2017.")
    }


# ----------------------------------------------------------------------------- quick runs


def test_accuracy_quick_runs_resumes_and_refuses_mixed_schedules(accuracy, tmp_path, results_dir_untouched):
    assert accuracy.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bccd_accuracy_quick.json").read_text())
    runs = {(r["method"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {("teacher", 42), ("baseline", 0), ("fitnet", 0)}
    for r in runs.values():
        assert set(r["metrics"]) >= {"AP", "AP50", "AP75"}
        assert r["command"].startswith("python train_net.py --config-file configs/bccd/")
        assert r["date"] and "commit" in r["git"] and r["wall_time_s"] > 0
        assert r["test_dataset"] == "bccd_quick_test"
    assert runs[("teacher", 42)]["iterations"] == 1 and runs[("fitnet", 0)]["iterations"] == 2
    assert "teacher_metrics" in runs[("fitnet", 0)]  # DISTILL.EVAL_TEACHER of the distill configs
    assert runs[("fitnet", 0)]["teacher_weights"] == runs[("teacher", 42)]["weights"]
    # Which teacher file each run used, by content: the fitnet run's is the teacher row's.
    assert len(runs[("teacher", 42)]["weights_sha1"]) == 40
    assert runs[("fitnet", 0)]["teacher_weights_sha1"] == runs[("teacher", 42)]["weights_sha1"]
    balance = runs[("fitnet", 0)]["loss_balance"]  # read back from the run's metrics.json
    assert balance["end"]["distill"] > 0 and balance["end"]["detector"] > 0 and "loss_balance" not in runs[("baseline", 0)]
    for key in (("baseline", 0), ("fitnet", 0)):  # the student's own fit, from the same file
        fit = runs[key]["detector_fit"]
        assert fit["end"]["loss_cls"] > 0 and fit["run"]["iterations"] == [1, 1]  # the last iteration is logged
    assert "detector_fit" not in runs[("teacher", 42)]
    md = (tmp_path / "bccd_accuracy_quick.md").read_text()
    assert "| fitnet | 1 |" in md and "python tools/benchmark_accuracy.py --quick --output-dir" in md
    assert (tmp_path / "bccd_accuracy_quick.png").stat().st_size > 0

    # A second invocation finds every (method, seed) and trains nothing.
    assert accuracy.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "bccd_accuracy_quick.json").read_text())
    assert [r["date"] for r in again["runs"]] == [r["date"] for r in data["runs"]]
    assert len(again["invocations"]) == 2
    # A run recorded without its loss balance or fit (older results) gets them back from its folder.
    for r in again["runs"]:
        r.pop("loss_balance", None)
        r.pop("detector_fit", None)
    (tmp_path / "bccd_accuracy_quick.json").write_text(json.dumps(again))
    assert accuracy.main(["--quick", "--output-dir", str(tmp_path), "--report-only"]) == 0
    restored = json.loads((tmp_path / "bccd_accuracy_quick.json").read_text())
    assert [r.get("loss_balance") for r in restored["runs"]] == [r.get("loss_balance") for r in data["runs"]]
    assert [r.get("detector_fit") for r in restored["runs"]] == [r.get("detector_fit") for r in data["runs"]]
    # Side-by-side runs are subprocesses: not with the in-process quick mode.
    with pytest.raises(SystemExit, match="--jobs N > 1 trains runs side by side in subprocesses"):
        accuracy.main(["--quick", "--output-dir", str(tmp_path), "--jobs", "2"])
    # Another schedule in the same results file is refused.
    with pytest.raises(SystemExit, match="--tag"):
        accuracy.main(["--quick", "--output-dir", str(tmp_path), "--student-iters", "3"])


def test_overhead_quick(tmp_path, results_dir_untouched):
    overhead = _load_tool("benchmark_overhead")
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


def test_overhead_given_weights_apply_only_to_their_teacher(tmp_path, teacher_r50_weights):
    """--teacher-weights of the Faster R-CNN teacher must not be forced onto a RetinaNet
    preset (a strict-load failure): that method falls back to auto and says why."""
    overhead = _load_tool("benchmark_overhead")
    from d2kd.benchmark import load_cfg

    cache = {}
    frcnn = load_cfg(os.path.join(REPO, "configs/bccd/distill_fitnet_R50_R18.yaml"))
    path, note = overhead.teacher_weights_for(frcnn, teacher_r50_weights, str(tmp_path), cache)
    assert path == teacher_r50_weights and note.startswith("given")
    retina = load_cfg(os.path.join(REPO, "configs/bccd/distill_fitnet_retinanet_R50_R18.yaml"))
    retina.merge_from_list(["DISTILL.TEACHER.WEIGHTS", str(tmp_path / "no_such_teacher.pth")])
    path, note = overhead.teacher_weights_for(retina, teacher_r50_weights, str(tmp_path), cache)
    assert path != teacher_r50_weights and os.path.isfile(path)
    assert note.startswith("random") and "another architecture" in note
    assert len(cache) == 2  # one teacher built per teacher config


def test_speed_quick(tmp_path, results_dir_untouched):
    speed = _load_tool("benchmark_speed")
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


def test_profile_overhead_excess_per_operator_and_quick_run(capsys):
    profile = _load_tool("profile_overhead")
    from collections import Counter

    per_op = {
        "student": Counter({"conv": 10.0, "bn": 2.0}),
        "teacher": Counter({"conv": 4.0}),
        "distill": Counter({"conv": 15.0, "bn": 2.5, "kl": 3.0}),
    }
    rows = profile.overhead_by_operator(per_op)
    assert [r[0] for r in rows] == ["kl", "conv", "bn"]  # by |distill - student - teacher|
    assert rows[0] == ("kl", 3.0, 0.0, 0.0, 3.0)
    assert rows[1][1] == pytest.approx(1.0) and rows[2][1] == pytest.approx(0.5)
    assert profile.main(["fitnet", "--quick", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "distill - student - teacher" in out and "aten::" in out
