"""
benchmarks/accuracy.py and its study modules (study.accuracy_plan, accuracy_results,
accuracy_provenance): resume decisions, schedule scaling, the results file, provenance, the
checks on the teacher, dry runs, and the --quick mode end to end, in-process, writing only
under tmp_path.
"""

import json
import math
import os
import re

import pytest

from conftest import REPO
from d2kd.config import load_config
from study import accuracy_plan, accuracy_provenance, accuracy_results, loss_balance, summarize
from study.accuracy_jobs import Job
from study.accuracy_provenance import file_sha1, teacher_changed_since_recorded


@pytest.fixture(scope="module")
def accuracy(load_script):
    return load_script("accuracy")


def test_loss_balance_keeps_weight_regularisers_apart(tmp_path):
    """HGD's learned-weight term trains only the weights: not in ``distill``, reported as ``regularizer``;
    a rebuilt report re-reads the balance only from a directory that still holds the run."""
    lines = [{"iteration": it, "loss_cls": 1.0, "loss_kd_hgd_p2": 0.5 + it, "loss_kd_hgd_logvar": -0.25 * it}
             for it in range(10)]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines + [{"iteration": 10, "bbox/AP": 1.0}]))
    balance = loss_balance(str(tmp_path))  # windows of 1: iterations 0 and 9
    assert balance["start"] == {"detector": 1.0, "distill": 0.5, "ratio": 0.5, "iterations": [0, 0], "regularizer": 0.0}
    assert balance["end"] == {"detector": 1.0, "distill": 9.5, "ratio": 9.5, "iterations": [9, 9], "regularizer": -2.25}
    entry = {"output_dir": str(tmp_path), "iterations": 10}
    assert accuracy_results._same_schedule(entry)  # the evaluation record (iteration 10) is not a training record
    assert not accuracy_results._same_schedule(dict(entry, iterations=600))
    assert not accuracy_results._same_schedule(dict(entry, output_dir=str(tmp_path / "gone")))


def test_baselines_imported_from_another_study_pair_by_seed(tmp_path):
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
    store = accuracy_results.ResultsFile(str(tmp_path / "variants.json"), results)
    assert accuracy_results.import_baselines(results, store, str(main), design["config"]) == [1, 2]
    baselines = {e["seed"]: e for e in results["runs"] if e["kind"] == "baseline"}
    assert sorted(baselines) == [0, 1, 2] and "imported_from" not in baselines[0]
    assert baselines[1]["imported_from"] == str(main) and baselines[1]["metrics"]["AP"] == 52.0
    row = summarize(results["runs"])["variant"]
    # pairs: seed 0: 53 - 50 = +3, seed 1: 51 - 52 = -1 -> mean +1, sample std sqrt(8) = 2.83
    assert row["AP_paired_n"] == 2 and row["AP_paired_gain"] == pytest.approx(1.0)
    assert row["AP_paired_gain_std"] == pytest.approx(math.sqrt(8))
    assert accuracy_results.import_baselines(results, store, str(main), design["config"]) == []  # nothing left to copy

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": [dict(run("baseline", 3, 49.0, "baseline"), iterations=300)]}))
    with pytest.raises(SystemExit, match="iterations 300 != 600"):
        accuracy_results.import_baselines(results, store, str(other), design["config"])


def test_copied_baselines_from_another_cpu_kind_are_warned_about():
    """--baseline-from copying baselines trained on another CPU kind than this machine warns,
    naming the seeds and CPUs and how to train the baseline here instead."""
    runs = [
        {"method": "baseline", "seed": 0, "kind": "baseline", "cpu": "AMD EPYC"},
        {"method": "baseline", "seed": 1, "kind": "baseline", "cpu": "Intel Xeon"},
        {"method": "baseline", "seed": 2, "kind": "baseline"},  # no cpu recorded: unknown
        {"method": "cwd", "seed": 0, "kind": "distill", "cpu": "AMD EPYC"},
    ]
    message = accuracy_results.baselines_from_another_cpu({"runs": runs}, [0, 1, 2], "Intel Xeon")
    assert message.startswith("WARNING") and "seed 0 on AMD EPYC" in message and "seed 1" not in message
    assert "this machine (Intel Xeon)" in message and "--force" in message
    assert accuracy_results.baselines_from_another_cpu({"runs": runs}, [1, 2], "Intel Xeon") is None
    assert accuracy_results.baselines_from_another_cpu({"runs": runs}, [], "Intel Xeon") is None


def test_schedule_override_scales_steps_and_distill_delays():
    cfg = load_config(os.path.join(REPO, "configs/bccd/distill_fitnet_R50_R18.yaml"))
    cfg.merge_from_list(["DISTILL.WARMUP_ITERS", 60, "DISTILL.STOP_ITER", 540])
    # 600 iterations, steps (450, 550), warm-up 100, checkpoints every 200 -> 300 iterations
    opts = accuracy_plan.scale_schedule_opts(cfg, 300)
    got = dict(zip(opts[0::2], opts[1::2]))
    assert got == {
        "SOLVER.MAX_ITER": "300",
        "SOLVER.STEPS": "(225, 275)",
        "SOLVER.WARMUP_ITERS": "50",
        "SOLVER.CHECKPOINT_PERIOD": "100",
        "DISTILL.WARMUP_ITERS": "30",
        "DISTILL.STOP_ITER": "270",
    }
    assert accuracy_plan.scale_schedule_opts(cfg, None) == [] and accuracy_plan.scale_schedule_opts(cfg, 600) == []


def test_run_folder_decides_harvest_resume_or_train(tmp_path):
    plan = lambda **kw: accuracy_plan.plan_action(str(tmp_path), 10, "bccd_test", 0, **kw)[0]  # noqa: E731
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
    assert accuracy_plan.plan_action(str(tmp_path), 20, "bccd_test", 0)[0] == "train"
    assert accuracy_plan.plan_action(str(tmp_path), 10, "bccd_test", 1)[0] == "train"
    assert accuracy_plan.plan_action(str(tmp_path), 10, "bccd_val", 0)[0] == "train"


def test_harvested_run_is_recorded_with_its_training_provenance_and_wall_time(tmp_path, monkeypatch):
    """
    A run that finished after its study process had gone is harvested later: its entry takes the
    commit, threads and command from the run folder (written when the run started), not from the
    harvesting invocation, and its wall time from file times.
    """
    fake_git = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(accuracy_provenance, "git_info", lambda: fake_git)
    out = str(tmp_path / "run")
    os.makedirs(out)
    job = Job("baseline", 1, "baseline", "configs/bccd/student_R18_FPN.yaml", [], out, 600, action="train")
    job.extra.update(threads=1, parallel_jobs=2, invocation="python benchmarks/accuracy.py --jobs 2")
    accuracy_provenance.note_run_start(job, start=1000.0)
    job.action = "resume"  # a resume appends; the wall time counts from the first start
    accuracy_provenance.note_run_start(job, start=1500.0)
    (tmp_path / "run" / "eval_results.json").write_text(json.dumps({"bbox": {"AP": 57.0, "AP50": 90.0, "AP75": 65.0}}))
    os.utime(os.path.join(out, "eval_results.json"), (4600.0, 4600.0))
    found = accuracy_provenance.run_provenance(out)
    assert found["wall_time_s"] == 3600.0 and "bench_job.json" in found["wall_time_source"]
    assert found["run_threads"] == 1 and found["parallel_jobs"] == 2 and found["git"] == fake_git
    assert found["benchmark_command"] == "python benchmarks/accuracy.py --jobs 2"

    # harvested by another invocation with other settings: the training run's values win
    fake_git = {"commit": "b" * 40, "dirty": True}
    monkeypatch.setattr(accuracy_provenance, "git_info", lambda: fake_git)
    harvest = Job("baseline", 1, "baseline", job.config, [], out, 600, action="harvest")
    harvest.extra.update(threads=None)
    args = type("Args", (), {"in_process": False, "jobs": 1})()
    split = {"train": "bccd_trainval", "test": "bccd_test"}
    entry = accuracy_results.record_job(harvest, {}, args, split, "python benchmarks/accuracy.py", None, 0.0)
    assert entry["git"]["commit"] == "a" * 40 and entry["run_threads"] == 1 and entry["parallel_jobs"] == 2
    assert entry["wall_time_s"] == 3600.0 and entry["harvested_by"] == "python benchmarks/accuracy.py"
    assert entry["metrics"]["AP"] == 57.0
    # a run this invocation trained is recorded with the commit it started from, not today's HEAD
    job.action = "resume"
    entry = accuracy_results.record_job(job, {}, args, split, "python benchmarks/accuracy.py --jobs 2", 100.0, 50.0)
    assert entry["git"]["commit"] == "a" * 40 and entry["wall_time_s"] == 150.0

    # only a resume recorded (the run began before bench_job.json existed): the wall time says it is partial
    os.remove(os.path.join(out, "bench_job.json"))
    accuracy_provenance.note_run_start(job, start=4000.0)
    found = accuracy_provenance.run_provenance(out)
    assert found["wall_time_s"] == 600.0 and "earlier iterations not included" in found["wall_time_source"]

    # a folder the study never started: train_net's config.yaml marks the start
    os.remove(os.path.join(out, "bench_job.json"))
    (tmp_path / "run" / "config.yaml").write_text("SEED: 1\n")
    os.utime(os.path.join(out, "config.yaml"), (4000.0, 4000.0))
    found = accuracy_provenance.run_provenance(out)
    assert found == {"wall_time_s": 600.0, "wall_time_source": "file times: config.yaml to eval_results.json"}

    # a fresh "train" start forgets the previous run's starts
    job.action = "train"
    accuracy_provenance.note_run_start(job, start=5000.0)
    assert [s["started"] for s in json.load(open(os.path.join(out, "bench_job.json")))["starts"]] == [5000.0]


def test_results_file_keeps_the_runs_of_another_study_process(tmp_path):
    """Two study processes writing one JSON file (each re-reads it before writing) keep each
    other's runs and invocations; a run of the same method and seed is replaced."""
    path = str(tmp_path / "study.json")

    def run(method, seed, ap):
        return {"method": method, "seed": seed, "metrics": {"AP": ap}}

    with open(path, "w") as f:
        json.dump({"benchmark": "b", "invocations": [{"command": "first"}], "runs": [run("baseline", 0, 50.0)]}, f)
    with open(path) as f:
        first = accuracy_results.ResultsFile(path, json.load(f))
    with open(path) as f:
        second = accuracy_results.ResultsFile(path, json.load(f))
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


def test_teacher_weights_changed_since_the_teacher_row(tmp_path):
    """The study warns when the teacher file it reuses is not the one its teacher row measured:
    by sha1 when recorded, else by a file written after the row's date."""
    import hashlib

    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"teacher weights" * 100000)  # > one 1 MiB read block
    digest = hashlib.sha1(weights.read_bytes()).hexdigest()
    assert file_sha1(str(weights)) == digest and file_sha1(str(tmp_path / "missing")) is None
    assert teacher_changed_since_recorded({"weights_sha1": digest}, str(weights)) is None
    changed = teacher_changed_since_recorded({"weights_sha1": "0" * 40}, str(weights))
    assert changed == f"sha1 {digest[:12]} is not the recorded 000000000000"
    # Older rows have no sha1: the file's time against the row's date (one minute's slack).
    os.utime(weights, (1_700_000_000, 1_700_000_000))  # 2023-11-14T22:13:20Z
    assert teacher_changed_since_recorded({"date": "2023-11-14T22:13:00+00:00"}, str(weights)) is None
    later = teacher_changed_since_recorded({"date": "2023-11-14T20:00:00+00:00"}, str(weights))
    assert later == "written 2023-11-14T22:13:20+00:00, after the teacher row was recorded (2023-11-14T20:00:00+00:00)"
    assert teacher_changed_since_recorded({"date": "2023-11-14T20:00:00+00:00"}, str(tmp_path / "x")) is None


def test_teacher_folder_written_recently_is_refused_until_idle(tmp_path):
    """A teacher folder another run may be writing is never trained into; an idle one is resumed."""
    job = Job("teacher", 0, "teacher", "configs/bccd/no_such_teacher.yaml", [], str(tmp_path), 10)
    metrics = tmp_path / "metrics.json"
    metrics.write_text("{}\n")
    with pytest.raises(SystemExit, match="resumes it from .* when metrics.json is 600 s old"):
        accuracy_plan._refuse_if_busy(str(tmp_path), job, dry_run=False)
    accuracy_plan._refuse_if_busy(str(tmp_path), job, dry_run=True)
    assert "WARNING: The teacher in" in job.reason
    old = metrics.stat().st_mtime - accuracy_plan.TEACHER_BUSY_SECONDS - 1
    os.utime(metrics, (old, old))
    job.reason = ""
    assert accuracy_plan._refuse_if_busy(str(tmp_path), job, dry_run=False) is None and job.reason == ""


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
    monkeypatch.setattr(accuracy_plan.os, "cpu_count", lambda: 4)
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
    assert accuracy_plan.teacher_saw_eval_images(trainval, "bccd_val") == (
        f"the teacher weights {trainval} were trained on bccd_trainval (config.yaml beside them), "
        f"which holds {n_val} of the {n_val} bccd_val images this study evaluates on"
    )
    assert accuracy_plan.teacher_saw_eval_images(trainval, "bccd_test") is None
    train = _run_folder(tmp_path / "train_teacher", ["bccd_train"])
    assert accuracy_plan.teacher_saw_eval_images(train, "bccd_val") is None
    mixed = _run_folder(tmp_path / "mixed_teacher", ["bccd_train", "bccd_test"])
    assert f"trained on bccd_test (config.yaml beside them), which holds {len(ids['test'])} of the" in (
        accuracy_plan.teacher_saw_eval_images(mixed, "bccd_test")
    )
    no_config = tmp_path / "downloaded" / "model_final.pth"
    no_config.parent.mkdir()
    no_config.write_bytes(b"weights")
    assert accuracy_plan.teacher_saw_eval_images(str(no_config), "bccd_val") is None  # cannot be told

    # The study stops before planning anything, and says what to do instead.
    common = ["--dry-run", "--eval-split", "val", "--output-dir", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="Drop --teacher-weights: the study then trains its own teacher on bccd_train"):
        accuracy.main(common + ["--methods", "kd", "--seeds", "0", "--teacher-weights", trainval])
    assert accuracy.main(common + ["--methods", "kd", "--seeds", "0", "--teacher-weights", train]) == 0
    assert not (tmp_path / "bccd_accuracy_val.json").exists()


# ----------------------------------------------------------------------------- quick runs


@pytest.mark.train
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
    assert "| fitnet | 1 |" in md and "python benchmarks/accuracy.py --quick --output-dir" in md
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
