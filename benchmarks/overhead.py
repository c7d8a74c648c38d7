#!/usr/bin/env python
"""
Training-time overhead of each distillation method on BCCD (R50 teacher -> R18 student).

    python benchmarks/overhead.py                       # every method
    python benchmarks/overhead.py --methods fitnet kd --steps 30
    python benchmarks/overhead.py --quick --output-dir /tmp/q
    python benchmarks/overhead.py --teacher-precision fp32 bf16 --tag teacher_precision
    python benchmarks/overhead.py --step-precision fp32 bf16 --tag amp

For each method, in one process, after warm-up, on the same batches (interleaved, so
background load hits all three alike), the median time of

- ``t_student``: a plain student training step (forward, backward, SGD step);
- ``t_teacher``: the teacher work the method's heads ask for, run by the method's own
  ``DistillationModel.teacher_runner`` (backbone only for feature heads; backbone + box head
  on the student's sampled proposals for RoI heads) -- exactly what a distillation step runs;
- ``t_distill``: a distillation training step (student + teacher parts + heads, backward, step);

and ``ratio = t_distill / (t_student + t_teacher)``. Targets: <= 1.10 for methods whose
heads use only features, <= 1.15 for methods using the RoI head.

``--teacher-precision fp32 bf16`` measures each method once per ``DISTILL.TEACHER.PRECISION``
(the teacher's forward under autocast in that dtype; the heads receive fp32 records), one row
each: ``t_teacher`` and ``t_distill`` show what a reduced-precision teacher saves.

``--step-precision fp32 bf16`` measures each method once per training-step precision: ``bf16``
(or ``fp16`` on a GPU) is ``SOLVER.AMP.ENABLED`` -- every phase's forward and loss sum under
``torch.autocast`` in that dtype, backward and SGD step on the fp32 parameters, as d2kd's
trainers run AMP -- one row each, and the report adds the whole-step AMP speed-up
(``t_student`` and ``t_distill`` in fp32 over the same in AMP). The fp16 rows time the step
without a gradient scaler (its cost is one multiply of the loss and an unscale of the gradients).

Peak memory of each phase = memory of the tensors the phase keeps (parameters, buffers,
optimizer state of the models it uses) + the transient peak during the step. The transient
is measured per phase: on CPU as the peak resident set size (VmHWM, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) minus the RSS before the step; on a GPU with
``torch.cuda.max_memory_allocated``. Target: ``mem_distill <= 1.10 * (mem_student + mem_teacher)``.

Data loading, logging, checkpointing and periodic head hooks are not part of a step here. The
teacher is the trained one at DISTILL.TEACHER.WEIGHTS when present, else a randomly
initialised teacher saved to a temporary checkpoint (timing does not depend on its weights;
the output says which was used).

The steps themselves (shared with ``benchmarks/profile_overhead.py``) are in
``study.overhead_steps``, the memory probe in ``study.memory``.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import OrderedDict

# The study package beside this script, and d2kd from a checkout that is not installed.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from d2kd.config import load_config  # noqa: E402
from d2kd.engine.amp import parse_precision  # noqa: E402
from study import (  # noqa: E402
    BCCD_CONFIG_DIR,
    METHOD_CONFIG_PATTERN,
    QUICK_INPUT_OPTS,
    RESULTS_DIR,
    STUDENT_CONFIG,
    command_string,
    datasets_dir,
    discover_methods,
    markdown_table,
    median,
    merge_opts,
    percentile,
    provenance,
    run_from_repo_root,
    select_names,
    split_method_pattern,
    write_json,
    write_text,
)
from study.memory import MemoryProbe, tensor_bytes  # noqa: E402
from study.overhead_steps import (  # noqa: E402
    build_distillation,
    build_plain_student,
    student_records,
    take_batches,
    teacher_weights_for,
    train_step,
)

SCRIPT = "benchmarks/overhead.py"
TARGET_FEATURE, TARGET_ROI, TARGET_MEMORY = 1.10, 1.15, 1.10
MB = 1024.0 * 1024.0


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", help="methods (default: every configs/bccd/distill_<method>_R50_R18.yaml)")
    p.add_argument(
        "--method-configs",
        default=os.path.join(BCCD_CONFIG_DIR, METHOD_CONFIG_PATTERN),
        help="where methods are discovered; {method} is the method name",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per phase (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase (default 20; --quick 2)")
    p.add_argument(
        "--memory-steps", type=int, default=None, help="steps per phase in the memory pass (default 2; --quick 1)"
    )
    p.add_argument(
        "--teacher-weights",
        default=None,
        help="auto (trained weights at DISTILL.TEACHER.WEIGHTS if present, else random; the default), "
        "random (the --quick default), or a path",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; --quick: 1)")
    p.add_argument("--output-dir", help="default benchmarks/results (--quick: output/benchmarks/quick)")
    p.add_argument("--tag", help="suffix of the results name (overhead_<tag>.json: another set of methods)")
    p.add_argument(
        "--teacher-precision",
        nargs="+",
        default=None,
        metavar="P",
        help="DISTILL.TEACHER.PRECISION values to measure each method with (fp32, bf16, fp16; default: the configs')",
    )
    p.add_argument(
        "--step-precision",
        nargs="+",
        default=None,
        metavar="P",
        help="training-step precisions to measure each method with: fp32 (AMP off) or bf16/fp16 "
        "(SOLVER.AMP.ENABLED in that precision); the report adds the AMP speed-up (default: the configs')",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 method, 128 px, batch 2, 1+2 steps")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for student and methods")
    return p


def _precision_name(dtype) -> str:
    """How a row names its training-step precision: "fp32" (AMP off), "bf16" or "fp16" (AMP)."""
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _step_precision_opts(name) -> list:
    """The SOLVER.AMP options of a ``--step-precision`` value (none for the configs' own)."""
    if name is None:
        return []
    dtype = parse_precision(name, "--step-precision")
    if dtype == torch.float32:
        return ["SOLVER.AMP.ENABLED", "False"]
    return ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", _precision_name(dtype)]


def amp_speedups(rows) -> list:
    """
    Per method (and teacher precision): the whole-step speed-up of mixed precision, from the rows
    of one run measured in fp32 and in AMP: ``t_student`` fp32 / AMP and ``t_distill`` fp32 / AMP.
    """
    fp32 = {(r["method"], r.get("teacher_precision")): r for r in rows if r.get("step_precision") == "fp32"}
    out = []
    for r in rows:
        base = fp32.get((r["method"], r.get("teacher_precision")))
        if base is None or r.get("step_precision", "fp32") == "fp32":
            continue
        t, b = r["time_ms"], base["time_ms"]
        out.append(
            OrderedDict(
                method=r["method"],
                teacher_precision=r.get("teacher_precision"),
                step_precision=r["step_precision"],
                student_speedup=b["student"]["median"] / t["student"]["median"],
                distill_speedup=b["distill"]["median"] / t["distill"]["median"],
                teacher_speedup=b["teacher"]["median"] / t["teacher"]["median"],
            )
        )
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- measurement


def measure_method(method, config, args, opts, tmpdir, cache, probe, device):
    from detectron2.utils.events import EventStorage

    cfg = load_config(config, opts)
    if args.quick:
        cfg.merge_from_list(["DISTILL.TEACHER.OPTS", [str(o) for o in QUICK_INPUT_OPTS]])
    weights, weights_note = teacher_weights_for(cfg, args.teacher_weights, tmpdir, cache)
    cfg.merge_from_list(["DISTILL.TEACHER.WEIGHTS", weights, "OUTPUT_DIR", os.path.join(tmpdir, method)])
    # The plain student is the method's own student config without distillation.
    batches = take_batches(cfg, args.warmup + args.steps)
    student, student_opt = build_plain_student(cfg)
    trainer, dm, distill_opt, it, hook_setup = build_distillation(cfg)
    dm.student.load_state_dict(student.state_dict())
    dm.train()
    runner = dm.teacher_runner
    parts = sorted(runner.parts)
    roi = "roi_box" in runner.parts
    target = TARGET_ROI if roi else TARGET_FEATURE

    step_dtype = parse_precision(cfg.SOLVER.AMP.PRECISION) if cfg.SOLVER.AMP.ENABLED else None
    if step_dtype is not None and device.type == "cpu" and step_dtype != torch.bfloat16:
        raise ValueError("on a CPU, mixed precision runs in bf16 (CPU autocast); use --step-precision fp32 bf16")

    def run_student(batch):
        train_step(student, student_opt, batch, autocast=step_dtype)

    if dm.schedule(it) <= 0:
        raise RuntimeError("distillation is never active within SOLVER.MAX_ITER (DISTILL.WARMUP_ITERS/STOP_ITER)")

    def run_distill(batch):
        losses = train_step(dm, distill_opt, batch, autocast=step_dtype)
        if not any(k.startswith("loss_kd_") for k in losses):
            raise RuntimeError(f"the distillation step returned no loss_kd_* term (got {sorted(losses)})")

    def run_teacher(batch, records):
        with torch.autocast(device.type, dtype=step_dtype, enabled=step_dtype is not None):
            runner(batch, records)

    times = {"student": [], "teacher": [], "distill": []}
    with EventStorage(it) as storage:
        trainer.storage, trainer.iter = storage, it
        n_warm = args.warmup
        for k, batch in enumerate(batches):
            records = student_records(dm, batch) if runner.parts else None
            phases = [
                ("student", lambda: run_student(batch)),
                ("distill", lambda: run_distill(batch)),
                ("teacher", lambda: run_teacher(batch, records)),
            ]
            shift = k % 3
            for name, fn in phases[shift:] + phases[:shift]:  # rotate the order: no phase always first
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                if k >= n_warm:
                    times[name].append(time.perf_counter() - start)

        transient = {"student": [], "teacher": [], "distill": []}
        if probe.available:
            for batch in batches[: args.memory_steps]:
                records = student_records(dm, batch) if runner.parts else None
                with probe.measure(transient["student"]):
                    run_student(batch)
                with probe.measure(transient["teacher"]):
                    run_teacher(batch, records)
                with probe.measure(transient["distill"]):
                    run_distill(batch)
                del records

    state = {
        "student": tensor_bytes(student, student_opt),
        "teacher": tensor_bytes(dm.teacher),
        "distill": tensor_bytes(dm, distill_opt, dm.teacher),
    }
    med = {k: median(v) for k, v in times.items()}
    ratio = med["distill"] / (med["student"] + med["teacher"])
    paired = median([d / (s + t) for s, t, d in zip(times["student"], times["teacher"], times["distill"])])
    row = OrderedDict(
        method=method,
        config=config,
        teacher_precision=cfg.DISTILL.TEACHER.PRECISION or "step",
        step_precision=_precision_name(step_dtype),
        heads=list(cfg.DISTILL.HEADS),
        teacher_parts=parts,
        uses_roi_head=roi,
        iteration=it,
        teacher_weights=weights_note,
        time_ms={
            k: {"median": 1e3 * med[k], "p25": 1e3 * percentile(v, 25), "p75": 1e3 * percentile(v, 75), "n": len(v)}
            for k, v in times.items()
        },
        ratio=ratio,
        ratio_paired_median=paired,
        ratio_target=target,
        ratio_ok=ratio <= target,
        head_hook_setup_s=hook_setup,
        ims_per_batch=int(cfg.SOLVER.IMS_PER_BATCH),
        min_size_train=list(cfg.INPUT.MIN_SIZE_TRAIN),
        student=f"{cfg.MODEL.META_ARCHITECTURE} R{cfg.MODEL.RESNETS.DEPTH}",
        trainable_head_params=sum(p.numel() for p in dm.heads.parameters() if p.requires_grad),
    )
    if probe.available:
        peak = {k: max(transient[k]) if transient[k] else 0 for k in transient}
        mem = {k: (state[k] + peak[k]) / MB for k in state}
        row["memory_mb"] = {k: {"total": mem[k], "state": state[k] / MB, "transient_peak": peak[k] / MB} for k in state}
        row["memory_ratio"] = mem["distill"] / (mem["student"] + mem["teacher"])
        row["memory_target"] = TARGET_MEMORY
        row["memory_ok"] = row["memory_ratio"] <= TARGET_MEMORY
    return row  # the models go with this frame; the caller collects


# ----------------------------------------------------------------------------- report


def render_markdown(report: dict) -> str:
    rows = []
    for r in report["methods"]:
        t = r["time_ms"]
        mem = r.get("memory_mb")
        rows.append(
            [
                r["method"],
                r.get("teacher_precision", "step"),
                r.get("step_precision", "fp32"),
                r["student"],
                "+".join(r["teacher_parts"]) or "–",
                f"{t['student']['median']:.0f}",
                f"{t['teacher']['median']:.0f}",
                f"{t['distill']['median']:.0f}",
                f"**{r['ratio']:.3f}**",
                f"≤ {r['ratio_target']:.2f} {'✓' if r['ratio_ok'] else '✗'}",
                f"{mem['student']['total']:.0f}" if mem else "n/a",
                f"{mem['teacher']['total']:.0f}" if mem else "n/a",
                f"{mem['distill']['total']:.0f}" if mem else "n/a",
                (f"{r['memory_ratio']:.3f} {'✓' if r['memory_ok'] else '✗'}") if mem else "n/a",
            ]
        )
    s = report["setup"]
    lines = [
        "# Distillation overhead per training step (BCCD; each method's own student and teacher)",
        "",
        f"Device {s['device']}, {report['provenance']['torch_threads']} thread(s), batch {s['ims_per_batch']} images "
        f"(short side {s['min_size_train']}), {s['warmup']} warm-up + {s['steps']} timed steps per phase, medians. "
        f"Teacher weights: {s['teacher_weights']}.",
        "",
        "Teacher precision: DISTILL.TEACHER.PRECISION (\"step\": the training step's, fp32 unless the step precision says AMP). "
        "ratio = t_distill / (t_student + t_teacher); target ≤ 1.10 (feature heads) or ≤ 1.15 (RoI heads). "
        "Memory (MB) = kept tensors (parameters, buffers, optimizer state) + transient peak of the step "
        f"({s['memory_method']}); target mem_distill ≤ 1.10 × (mem_student + mem_teacher).",
        "",
        markdown_table(
            [
                "Method",
                "teacher precision",
                "step precision",
                "student",
                "teacher runs",
                "t_student ms",
                "t_teacher ms",
                "t_distill ms",
                "ratio",
                "target",
                "mem student",
                "mem teacher",
                "mem distill",
                "mem ratio",
            ],
            rows,
            align="lllllrrrrlrrrr",
        ),
        *_amp_lines(report.get("amp_speedup") or []),
        f"Made by `{report['command']}` on {report['provenance']['date']}, commit "
        f"{(report['provenance']['git'].get('commit') or '?')[:12]}"
        f"{' (with local changes)' if report['provenance']['git'].get('dirty') else ''}; "
        f"{report['provenance']['cpu']}, torch {report['provenance']['torch']}.",
        "",
    ]
    return "\n".join(lines)


def _amp_lines(speedups) -> list:
    if not speedups:
        return []
    rows = [
        [
            s["method"],
            s["teacher_precision"] or "step",
            s["step_precision"],
            f"{s['student_speedup']:.2f}x",
            f"{s['teacher_speedup']:.2f}x",
            f"**{s['distill_speedup']:.2f}x**",
        ]
        for s in speedups
    ]
    return [
        "Whole-step mixed-precision speed-up (SOLVER.AMP.ENABLED; the fp32 row's median time over the AMP row's):",
        "",
        markdown_table(
            ["Method", "teacher precision", "AMP", "student step", "teacher parts", "distillation step"],
            rows,
            align="lllrrr",
        ),
    ]


def _main(args, argv) -> int:
    if args.quick:
        args.warmup = 1 if args.warmup is None else args.warmup
        args.steps = 2 if args.steps is None else args.steps
        args.memory_steps = 1 if args.memory_steps is None else args.memory_steps
    args.warmup = 3 if args.warmup is None else args.warmup
    args.steps = 20 if args.steps is None else args.steps
    args.memory_steps = 2 if args.memory_steps is None else args.memory_steps
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    output_dir = args.output_dir or ("output/benchmarks/quick" if args.quick else RESULTS_DIR)
    name = "overhead" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")

    available = discover_methods(*split_method_pattern(args.method_configs))
    if args.quick and not args.methods:
        args.methods = ["fitnet"] if "fitnet" in available else list(available)[:1]
    methods = select_names(args.methods, list(available))

    from d2kd import register_bccd

    register_bccd(datasets_dir())
    opts = merge_opts(QUICK_INPUT_OPTS if args.quick else [], ["MODEL.DEVICE", str(device)], args.opts)
    student_cfg = load_config(STUDENT_CONFIG, opts)  # the BCCD input settings, for the header
    print(
        f"Overhead on {device} with {torch.get_num_threads()} thread(s): methods {methods}; "
        f"{args.warmup} warm-up + {args.steps} timed steps, batch {student_cfg.SOLVER.IMS_PER_BATCH}.",
        flush=True,
    )
    probe = MemoryProbe(device)
    memory_method = {
        "cuda": "torch.cuda.max_memory_allocated",
        "rss": "peak RSS via /proc/self/clear_refs + VmHWM",
        None: "unavailable on this system",
    }[probe.kind]
    rows, cache, failures, notes = [], {}, [], set()
    precisions = args.teacher_precision or [None]
    step_precisions = args.step_precision or [None]
    for step_precision in step_precisions:
        _step_precision_opts(step_precision)  # a clear error for a misspelt precision, before any model is built
    runs = [(m, p, sp) for m in methods for p in precisions for sp in step_precisions]
    with tempfile.TemporaryDirectory(prefix="d2kd_overhead_") as tmpdir:
        for i, (method, precision, step_precision) in enumerate(runs):
            start = time.time()
            label = method + (f" (teacher {precision})" if precision else "")
            label += f" (step {step_precision})" if step_precision else ""
            if not load_config(available[method], opts).DISTILL.HEADS:  # e.g. DISTILL.INHERIT alone
                print(f"[{i + 1}/{len(runs)}] {label}: skipped (no DISTILL.HEADS, no distillation step)")
                continue
            run_opts = merge_opts(
                opts,
                ["DISTILL.TEACHER.PRECISION", precision] if precision else [],
                _step_precision_opts(step_precision),
            )
            try:
                row = measure_method(method, available[method], args, run_opts, tmpdir, cache, probe, device)
            except Exception as e:  # one broken method must not hide the others' numbers
                failures.append(label)
                print(f"[{i + 1}/{len(runs)}] {label}: FAILED ({type(e).__name__}: {e})", flush=True)
                continue
            gc.collect()
            rows.append(row)
            notes.add(row["teacher_weights"])
            t = row["time_ms"]
            mem = row.get("memory_mb")
            print(
                f"[{i + 1}/{len(runs)}] {label} ({time.time() - start:.0f} s): "
                f"student {t['student']['median']:.0f} ms, "
                f"teacher[{'+'.join(row['teacher_parts']) or '-'}] {t['teacher']['median']:.0f} ms, distill "
                f"{t['distill']['median']:.0f} ms -> ratio = t_distill / (t_student + t_teacher) = {row['ratio']:.3f} "
                f"(target <= {row['ratio_target']:.2f}: {'OK' if row['ratio_ok'] else 'ABOVE'})"
                + (
                    f"; memory MB student {mem['student']['total']:.0f}, teacher {mem['teacher']['total']:.0f}, "
                    f"distill {mem['distill']['total']:.0f} -> {row['memory_ratio']:.3f} "
                    f"(target <= {TARGET_MEMORY:.2f}: {'OK' if row['memory_ok'] else 'ABOVE'})"
                    if mem
                    else ""
                )
                + (
                    f"; head hooks' one-off setup (not in the step) {row['head_hook_setup_s']:.1f} s"
                    if row["head_hook_setup_s"]
                    else ""
                ),
                flush=True,
            )
    report = OrderedDict(
        benchmark="overhead",
        command=command_string(SCRIPT, argv),
        provenance=provenance(str(device)),
        setup=OrderedDict(
            device=str(device),
            ims_per_batch=int(student_cfg.SOLVER.IMS_PER_BATCH),
            min_size_train=list(student_cfg.INPUT.MIN_SIZE_TRAIN),
            warmup=args.warmup,
            steps=args.steps,
            memory_steps=args.memory_steps,
            memory_method=memory_method,
            teacher_weights="; ".join(sorted(notes)) or "?",
            teacher_precisions=[p or "step" for p in precisions],
            step_precisions=[p or "config" for p in step_precisions],
            opts=opts,
        ),
        methods=rows,
        amp_speedup=amp_speedups(rows),
        failed=failures,
    )
    json_path, md_path = os.path.join(output_dir, name + ".json"), os.path.join(output_dir, name + ".md")
    write_json(json_path, report)
    write_text(md_path, render_markdown(report))
    print(render_markdown(report))
    print(f"Wrote {json_path} and {md_path}")
    return 1 if failures else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.teacher_weights is None:
        args.teacher_weights = "random" if args.quick else "auto"
    return run_from_repo_root(_main, args, argv, ("output_dir", "teacher_weights"))


if __name__ == "__main__":
    sys.exit(main())
