#!/usr/bin/env python
"""
Accuracy study on BCCD: the R50 teacher, the R18 student baseline and the student distilled
with every method preset, over several seeds; COCO-style AP, AP50, AP75.

    python benchmarks/accuracy.py                         # every method, seeds 0 1 2, bccd_test
    python benchmarks/accuracy.py --methods kd fitnet --seeds 0 1
    python benchmarks/accuracy.py --eval-split val        # tuning: train bccd_train, eval bccd_val
    python benchmarks/accuracy.py --dry-run               # print the plan and the commands
    python benchmarks/accuracy.py --report-only           # redraw the table/chart from the JSON
    python benchmarks/accuracy.py --quick --output-dir /tmp/q   # seconds-long smoke run

Methods are the files ``configs/bccd/distill_<method>_R50_R18.yaml`` present at run time.
Every run is ``python train_net.py --config-file <config> SEED <s> OUTPUT_DIR <dir> ...``
(a subprocess by default, ``--in-process`` to call ``train_net.main``); train_net writes
``OUTPUT_DIR/eval_results.json`` after training, which is what is recorded.

Results accumulate in ``<output-dir>/bccd_accuracy[_val][_<tag>].json``, one entry per
(method, seed) with the command, config, iterations, wall time, date and git commit; a
(method, seed) already there is skipped unless ``--force``; an interrupted training is
continued with ``--resume``. The Markdown table (mean +- sample std over seeds, gain over the
baseline, fraction of the teacher-student gap closed) and a bar chart are written beside it.

The teacher is trained once: in the default (test) study it lives at the path the distill
configs read (``output/bccd/teacher_R50_FPN/model_final.pth``) and is reused when present.
Where the results hold a teacher row but its weights are gone (a new machine), the weights are
trained again only when a distillation run needs them; the recorded row stays the study's
teacher, and each run records the teacher AP it was distilled from.
The validation study (``--eval-split val``) trains its own teacher on ``bccd_train`` so no
number used for tuning has seen ``bccd_val``; never tune on ``bccd_test``. Teacher weights whose
run trained on images of the evaluated split (the ``config.yaml`` beside them names a
``DATASETS.TRAIN`` that shares images with it, e.g. the ``bccd_trainval`` teacher given with
``--teacher-weights`` to a validation study) are refused before anything runs.

``--student-iters`` / ``--teacher-iters`` change MAX_ITER and scale SOLVER.STEPS,
SOLVER.CHECKPOINT_PERIOD, DISTILL.WARMUP_ITERS and DISTILL.STOP_ITER in proportion; the
iterations are recorded with each result, and one results file never mixes schedules (use
``--tag`` for a second schedule).

This script is the study's command line; the study itself lives in the ``study`` package beside
it: its plan (``study.accuracy_plan``), runners (``accuracy_runners``), results file
(``accuracy_results``), provenance (``accuracy_provenance``) and report (``accuracy_report``).
"""

import argparse
import os
import sys
import time
from collections import OrderedDict

# The study package beside this script, and d2kd from a checkout that is not installed.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from study import (  # noqa: E402
    BCCD_CONFIG_DIR,
    METHOD_CONFIG_PATTERN,
    METRICS,
    Progress,
    RESULTS_DIR,
    STUDENT_CONFIG,
    TEACHER_CONFIG,
    command_string,
    datasets_dir,
    discover_methods,
    fmt_duration,
    provenance,
    read_json,
    render_chart,
    render_markdown,
    run_from_repo_root,
    run_with_dependencies,
    select_names,
    split_method_pattern,
    study_methods,
    write_text,
)
from study.accuracy_jobs import COST, QUICK_SPLIT, SPLITS, RunFailed  # noqa: E402
from study.accuracy_plan import plan_jobs, register_quick_datasets  # noqa: E402
from study.accuracy_results import (  # noqa: E402
    ResultsFile,
    backfill_runs,
    baselines_from_another_cpu,
    import_baselines,
    read_eval_results,
    record_job,
)
from study.accuracy_runners import InProcessRunner, SubprocessRunner, run_job  # noqa: E402

SCRIPT = "benchmarks/accuracy.py"


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--methods", nargs="+", help="methods to run (default: every configs/bccd/distill_<method>_R50_R18.yaml)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="SEED values (default: 0 1 2; --quick: 0)")
    p.add_argument("--no-baseline", action="store_true", help="do not run the student baseline")
    p.add_argument(
        "--baseline-from",
        metavar="JSON",
        help="copy the student baseline runs of another study's results file (same student config, "
        "schedule and split) for the seeds this study lacks, e.g. a variants study reusing the main "
        "study's baselines",
    )
    p.add_argument(
        "--method-configs",
        default=os.path.join(BCCD_CONFIG_DIR, METHOD_CONFIG_PATTERN),
        help="where methods are discovered; {method} is the method name "
        "(e.g. 'benchmarks/configs/bccd/hgd_variants/{method}.yaml')",
    )
    p.add_argument(
        "--student-config", default=STUDENT_CONFIG, help="the baseline; methods must distil into this student"
    )
    p.add_argument("--teacher-config", default=TEACHER_CONFIG, help="the teacher; methods must distil from it")
    p.add_argument(
        "--eval-split",
        choices=sorted(SPLITS),
        default="test",
        help="test: train bccd_trainval, evaluate bccd_test (report). val: train bccd_train, "
        "evaluate bccd_val (tuning; its own teacher)",
    )
    p.add_argument("--student-iters", type=int, help="override SOLVER.MAX_ITER of student runs (schedule scaled)")
    p.add_argument("--teacher-iters", type=int, help="override SOLVER.MAX_ITER of the teacher (if it is trained here)")
    p.add_argument(
        "--teacher-weights", help="use these teacher weights (not trained here); it is evaluated on the split"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-run (method, seed) pairs already in the results (a teacher whose model_final.pth exists is "
        "re-evaluated, never retrained: delete it to retrain)",
    )
    p.add_argument("--tag", default="", help="suffix of the results name (a second schedule, an ablation)")
    p.add_argument(
        "--output-dir",
        help="where the JSON/Markdown/PNG go (default benchmarks/results; " "--quick: output/benchmarks/quick)",
    )
    p.add_argument("--work-dir", help="where runs train (default output/benchmarks; --quick: <output-dir>/work)")
    p.add_argument(
        "--in-process", action="store_true", help="call train_net.main in this process (default: a subprocess per run)"
    )
    p.add_argument("--num-gpus", type=int, default=1, help="passed to train_net.py")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's; --quick: 1); " "subprocess runs get OMP_NUM_THREADS",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained side by side (subprocesses; default 1). Each gets --threads or else "
        "cpu_count // jobs threads (a teacher trained with no baseline beside it gets cpu_count); "
        "distillation runs start once the teacher is trained",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rewrite the Markdown table and chart from the JSON")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 method, 1 seed, 2 iterations, 128 px, a few images, in-process",
    )
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides appended to every run")
    return p


def _invocation(argv) -> dict:
    """What the results file records of one run of this script: its command, date and commit."""
    found = provenance()
    return {"command": command_string(SCRIPT, argv), "date": found["date"], "git": found["git"]}


def _results_name(args) -> str:
    name = "bccd_accuracy" + ("_val" if args.eval_split == "val" else "") + ("_quick" if args.quick else "")
    tag = args.tag
    if not tag and os.path.normpath(args.student_config) != os.path.normpath(STUDENT_CONFIG):
        tag = os.path.splitext(os.path.basename(args.student_config))[0]  # another student: another study
    return name + (f"_{tag}" if tag else "")


def _main(args, argv) -> int:
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.quick:
        args.in_process = True
        args.student_iters = args.student_iters or 2
        args.teacher_iters = args.teacher_iters or 1
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}.")
    if args.jobs > 1 and args.in_process:
        raise SystemExit(
            "--jobs N > 1 trains runs side by side in subprocesses; drop --in-process (and --quick, which "
            "runs in-process) or use --jobs 1."
        )
    output_dir = args.output_dir or ("output/benchmarks/quick" if args.quick else RESULTS_DIR)
    name = _results_name(args)
    args._json = json_path = os.path.join(output_dir, name + ".json")
    md_path, png_path = os.path.join(output_dir, name + ".md"), os.path.join(output_dir, name + ".png")
    results = read_json(json_path) or {}
    store = ResultsFile(json_path, results)
    backfilled = backfill_runs(results, store)

    if args.baseline_from:
        seeds = import_baselines(results, store, args.baseline_from, args.student_config)
        print(f"Baseline seeds {seeds} copied from {args.baseline_from}" if seeds else "No baseline seed to copy.")
        warning = baselines_from_another_cpu(results, seeds, provenance()["cpu"])
        if warning and not args.report_only:
            print(warning)
        if seeds and args.report_only:  # otherwise the study records its invocation below
            store.add_invocation(_invocation(argv))
        backfilled = backfilled or bool(seeds)

    if args.report_only:
        if backfilled:
            store.write()
        write_text(md_path, render_markdown(results))
        render_chart(results, png_path)
        print(render_markdown(results))
        print(f"Wrote {md_path} and {png_path}")
        return 0

    found = discover_methods(*split_method_pattern(args.method_configs))
    available, skipped = study_methods(found, args.student_config, args.teacher_config)
    for m in args.methods or []:
        if m in skipped:
            raise SystemExit(f"Method '{m}' ({found[m]}) is not part of this study: {skipped[m]}.")
    if skipped:
        print("Not in this study (another student or teacher): " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if args.quick and not args.methods:
        args.methods = ["fitnet"] if "fitnet" in available else list(available)[:1]
    methods = OrderedDict((m, available[m]) for m in select_names(args.methods, list(available)))
    split = dict(SPLITS[args.eval_split])
    work_root = os.path.join(
        args.work_dir or (os.path.join(output_dir, "work") if args.quick else "output/benchmarks"), name
    )
    if args.quick:
        split = dict(QUICK_SPLIT)

    results.setdefault("benchmark", "bccd_accuracy")
    if results.get("test_dataset", split["test"]) != split["test"]:
        raise SystemExit(f"{json_path} holds results on {results['test_dataset']}, not {split['test']}.")
    results.update({"split": args.eval_split, "train_dataset": split["train"], "test_dataset": split["test"]})
    results.update({"student_config": args.student_config, "teacher_config": args.teacher_config})

    jobs = plan_jobs(args, methods, split, work_root, results)
    command = command_string(SCRIPT, argv)
    for job in jobs:  # what note_run_start records in each run folder
        job.extra.update(invocation=command, parallel_jobs=args.jobs)
    print(
        f"Accuracy study '{name}': train {split['train']}, evaluate {split['test']}; methods {list(methods)}; "
        f"seeds {args.seeds}; {'in-process' if args.in_process else 'subprocess'} runs under {work_root}"
    )
    for i, job in enumerate(jobs):
        threads = job.extra.get("threads")
        threads_note = f"; {threads} thread{'s' if threads != 1 else ''}" if threads else ""
        print(
            f"  {i + 1:>2}. {job.label:<24} {job.action:<8} ({job.reason}); {job.iterations} iters{threads_note}\n"
            f"      {job.command() if job.action not in ('skip', 'harvest') else ''}".rstrip()
        )
    if args.dry_run:
        return 0
    if args.quick:
        register_quick_datasets(os.path.join(work_root, "quick_data"))
    elif args.in_process:
        from d2kd import register_bccd

        register_bccd(datasets_dir())

    store.add_invocation(_invocation(argv))
    store.write()
    runner = InProcessRunner() if args.in_process else SubprocessRunner()
    progress = Progress([0 if j.action in ("skip", "harvest") else COST[j.kind] * j.iterations for j in jobs])
    index = {id(job): i for i, job in enumerate(jobs)}
    started = {}
    teacher_keys = {job.key for job in jobs if job.kind == "teacher" and job.action != "skip"}
    for job in jobs:
        if job.action == "skip":
            print(progress.line(index[id(job)], f"{job.label}: skipped ({job.reason})"), flush=True)

    def on_start(job):
        started[id(job)] = time.time()
        print(
            progress.line(index[id(job)], f"{job.label}: {job.action} ({job.iterations} iters) -> {job.output_dir}"),
            flush=True,
        )

    def on_success(job, outcome):
        seconds = time.time() - started[id(job)]
        progress.finished(index[id(job)], seconds / max(1, args.jobs))
        if job.extra.get("keep_recorded_row"):  # weights trained again for the runs; the row stays
            ap = read_eval_results(job.output_dir)["bbox"].get("AP")
            print(
                f"    {job.label} trained again in {fmt_duration(seconds)}: AP {ap if ap is None else round(ap, 2)} "
                "(the results' teacher row is kept; each distillation run records the teacher AP it used)",
                flush=True,
            )
            return
        entry = record_job(job, results, args, split, command, *outcome)
        store.add_run(entry)
        store.write()
        write_text(md_path, render_markdown(results))
        m = entry["metrics"]
        print(
            f"    {job.label} done in {fmt_duration(seconds)}: "
            + ", ".join(f"{k} {m.get(k) if m.get(k) is None else round(m[k], 2)}" for k in METRICS),
            flush=True,
        )

    def on_failure(job, error):
        print(f"    FAILED {job.label}: {error}", flush=True)
        if job.kind == "teacher":
            print("The teacher could not be trained; the distillation runs need it.", flush=True)

    outcome = run_with_dependencies(
        [job for job in jobs if job.action != "skip"],
        lambda job: run_job(job, runner),
        max_parallel=args.jobs,
        key=lambda job: job.key,
        depends_on=lambda job: teacher_keys if job.kind == "distill" else (),
        on_start=on_start,
        on_success=on_success,
        on_failure=on_failure,
        failure_types=(RunFailed,),
    )
    failures = [job.label for job in outcome["failed"] + outcome["blocked"]]
    if outcome["blocked"]:
        print(f"Not run (their teacher failed): {[job.label for job in outcome['blocked']]}", flush=True)

    store.write()
    write_text(md_path, render_markdown(results))
    render_chart(results, png_path)
    print(render_markdown(results))
    print(f"Wrote {json_path}, {md_path}, {png_path}")
    if failures:
        print(f"{len(failures)} run(s) failed: {failures}. Re-run the same command to retry them.")
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_repo_root(_main, args, argv, ("output_dir", "work_dir", "teacher_weights"))


if __name__ == "__main__":
    sys.exit(main())
