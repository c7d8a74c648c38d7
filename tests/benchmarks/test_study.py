"""
The study package's shared bookkeeping (benchmarks/study): method discovery from the config
files, which methods belong to a study, the reproducing command, override lists, the scheduler
of side-by-side runs, the git state of the results, and the validation-tuning configs.
"""

import os
import subprocess

import pytest

from conftest import REPO
from d2kd.config import load_config
from study import discover_methods, merge_opts, select_names, split_method_pattern, study_methods


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
    from study import study_methods

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
    from study import command_string

    for k in list(os.environ):
        if k.startswith("MALLOC_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            monkeypatch.delenv(k)
    assert command_string("benchmarks/x.py", ["--methods", "a b"]) == "python benchmarks/x.py --methods 'a b'"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "68719476736")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("UNRELATED", "1")
    assert (
        command_string("benchmarks/x.py", ["--seeds", "0"])
        == "MALLOC_TRIM_THRESHOLD_=68719476736 OMP_NUM_THREADS=1 python benchmarks/x.py --seeds 0"
    )


class _Fatal(Exception):
    pass


def _scheduled(tasks, max_parallel, teacher_error=None):
    """Run named tasks ("T" teacher, "B*" baselines, "D*" depend on T) through the scheduler."""
    import threading

    from study import run_with_dependencies

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


def test_git_info_ignores_the_benchmark_results_folder(tmp_path, monkeypatch):
    """The studies write benchmarks/results/ while they run; that must not mark their tree dirty."""
    from study import common

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


def _flat(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_validation_tuning_configs_change_only_their_setting():
    """benchmarks/configs/bccd/val_tuning: each variant is its preset with only the named settings changed
    (cwd and kd are the presets themselves; cwd_kd adds the kd head at kd's preset values, cwd_rpn the chen2017
    head's RPN terms at the chen2017 preset's values; chen2017_no_hint and chen2017_hints split the chen2017
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
    found = discover_methods(*split_method_pattern("benchmarks/configs/bccd/val_tuning/{method}.yaml"))
    assert sorted(found) == sorted(expected)
    kept, skipped = study_methods(found, "configs/bccd/student_R18_FPN.yaml", "configs/bccd/teacher_R50_FPN.yaml")
    assert sorted(kept) == sorted(expected) and not skipped
    for name, (preset, changes) in expected.items():
        variant = _flat(load_config(found[name]))
        base = _flat(load_config(os.path.join(REPO, "configs", "bccd", preset)))
        differ = {k: variant[k] for k in variant if variant[k] != base.get(k)}
        assert differ == dict(changes, OUTPUT_DIR=f"output/bccd/val_tuning/{name}"), name
    kd = _flat(load_config(os.path.join(REPO, "configs", "bccd", "distill_kd_R50_R18.yaml")))
    cwd_kd = _flat(load_config(found["cwd_kd"]))
    assert {k: cwd_kd[k] for k in kd if k.startswith("DISTILL.KD.")} == {k: kd[k] for k in kd if k.startswith("DISTILL.KD.")}
    chen = _flat(load_config(found["chen2017_rpn"]))
    cwd_rpn = _flat(load_config(found["cwd_rpn"]))
    assert {k: cwd_rpn[k] for k in chen if k.startswith("DISTILL.CHEN2017.")} == {
        k: chen[k] for k in chen if k.startswith("DISTILL.CHEN2017.")
    }


def test_loss_balance_target_configs_change_only_the_balance():
    """benchmarks/configs/bccd/loss_balance: the kd and cwd presets with DISTILL.LOSS_BALANCE initial at the
    two targets the validation study compares (0.5, 1.0), each trained with the paper weights while measuring
    (MEASURE_MULTIPLIER 1, as the first grid runs ran) and measured only (0), nothing else changed, in the
    R50 -> R18 study."""
    targets = {"05": 0.5, "1": 1.0}
    measuring = {"": 1.0, "_measure_only": 0.0}
    expected = {
        f"{m}_bal{k}{suffix}": (m, t, w) for m in ("kd", "cwd") for k, t in targets.items() for suffix, w in measuring.items()
    }
    found = discover_methods(*split_method_pattern("benchmarks/configs/bccd/loss_balance/{method}.yaml"))
    assert sorted(found) == sorted(expected)
    kept, skipped = study_methods(found, "configs/bccd/student_R18_FPN.yaml", "configs/bccd/teacher_R50_FPN.yaml")
    assert sorted(kept) == sorted(expected) and not skipped
    for name, (preset, target, measure_multiplier) in expected.items():
        variant = _flat(load_config(found[name]))
        base = _flat(load_config(os.path.join(REPO, "configs", "bccd", f"distill_{preset}_R50_R18.yaml")))
        wanted = {
            "DISTILL.LOSS_BALANCE.MODE": "initial",
            "DISTILL.LOSS_BALANCE.TARGET": target,
            "DISTILL.LOSS_BALANCE.MEASURE_MULTIPLIER": measure_multiplier,
            "OUTPUT_DIR": f"output/bccd/loss_balance/{name}",
        }
        assert {k: variant[k] for k in wanted} == wanted, name
        assert {k for k in variant if variant[k] != base.get(k)} <= set(wanted), name


def test_balanced_configs_are_every_faster_rcnn_preset_with_the_balance_on():
    """benchmarks/configs/bccd/balanced: one `<method>_balanced` per head's Faster R-CNN R50 -> R18 preset (the
    variants fbkd_paper, fgd_inherit, gkd_released_code and inherit aside), each its preset with
    DISTILL.LOSS_BALANCE.MODE initial at the default TARGET and nothing else changed."""
    methods = ["chen2017", "cwd", "defeat", "fbkd", "fgd", "fgfi", "fitnet", "gkd", "hgd", "kd", "pkd", "mgd"]
    found = discover_methods(*split_method_pattern("benchmarks/configs/bccd/balanced/{method}.yaml"))
    assert sorted(found) == sorted(f"{m}_balanced" for m in methods)
    kept, skipped = study_methods(found, "configs/bccd/student_R18_FPN.yaml", "configs/bccd/teacher_R50_FPN.yaml")
    assert not skipped
    for method in methods:
        variant = _flat(load_config(found[f"{method}_balanced"]))
        base = _flat(load_config(os.path.join(REPO, "configs", "bccd", f"distill_{method}_R50_R18.yaml")))
        assert variant["DISTILL.HEADS"] and method.replace("_", "") in "".join(variant["DISTILL.HEADS"]).lower()
        assert {k: variant[k] for k in variant if variant[k] != base.get(k)} == {
            "DISTILL.LOSS_BALANCE.MODE": "initial",
            "OUTPUT_DIR": f"output/bccd/balanced/{method}_balanced",
        }, method
