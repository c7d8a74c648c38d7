#!/usr/bin/env python
"""
Where a method's distillation overhead goes: profiles (torch.profiler, CPU self time) the
plain student step, the teacher forward the method needs and the distillation step, and
prints per operator ``distill - student - teacher`` per step, largest first. Use it when
``benchmarks/overhead.py`` reports a ratio above its target: it separates work the method
adds (its loss operators appear only in the distillation step) from the same operators
running slower inside the combined step.

    python benchmarks/profile_overhead.py cwd_retinanet            # configs/bccd/distill_cwd_retinanet_R50_R18.yaml
    python benchmarks/profile_overhead.py fgd --steps 5 --top 40
    python benchmarks/profile_overhead.py fitnet --quick           # smoke test (tiny inputs, 1 step)

The teacher is randomly initialised (the timing of its forward does not depend on its
weights). Numbers are per step, averaged over ``--steps`` profiled steps after
``--warmup`` unprofiled ones; the profiler itself adds some time to every phase.
"""

import argparse
import collections
import os
import sys
import tempfile

# The study package beside this script, and d2kd from a checkout that is not installed.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from d2kd.config import load_config  # noqa: E402
from study import (  # noqa: E402
    BCCD_CONFIG_DIR,
    METHOD_CONFIG_PATTERN,
    QUICK_INPUT_OPTS,
    datasets_dir,
    merge_opts,
    run_from_repo_root,
)
from study import overhead_steps  # noqa: E402  (the steps benchmarks/overhead.py times)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("method", help="a method preset: configs/bccd/distill_<method>_R50_R18.yaml, or a config path")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps per phase (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per phase (default 3; --quick 1)")
    p.add_argument("--top", type=int, default=25, help="operators to print")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 px inputs, batch 2, 1 + 1 steps")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    return p


def profile_phases(cfg, warmup: int, steps: int):
    """``{phase: Counter(operator -> self CPU ms per step)}`` for student, teacher, distill."""
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile

    batches = overhead_steps.take_batches(cfg, warmup + steps)
    student, student_opt = overhead_steps.build_plain_student(cfg)
    trainer, dm, distill_opt, it, _ = overhead_steps.build_distillation(cfg)
    dm.student.load_state_dict(student.state_dict())
    dm.train()
    phases = {
        "student": lambda batch, records: overhead_steps.train_step(student, student_opt, batch),
        "teacher": lambda batch, records: dm.teacher_runner(batch, records),
        "distill": lambda batch, records: overhead_steps.train_step(dm, distill_opt, batch),
    }
    per_op = {}
    with EventStorage(it) as storage:
        trainer.storage, trainer.iter = storage, it
        records = [overhead_steps.student_records(dm, b) if dm.teacher_runner.parts else None for b in batches]
        for batch, rec in zip(batches[:warmup], records[:warmup]):
            for run in phases.values():
                run(batch, rec)
        for name, run in phases.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for batch, rec in zip(batches[warmup:], records[warmup:]):
                    run(batch, rec)
            totals = collections.Counter()
            for event in prof.key_averages():
                totals[event.key] += event.self_cpu_time_total / 1e3 / steps
            per_op[name] = totals
    return per_op


def overhead_by_operator(per_op):
    """``[(operator, distill - student - teacher, student, teacher, distill)]``, largest |excess| first."""
    names = set().union(*per_op.values())
    rows = [
        (n, per_op["distill"][n] - per_op["student"][n] - per_op["teacher"][n])
        + tuple(per_op[p][n] for p in ("student", "teacher", "distill"))
        for n in names
    ]
    return sorted(rows, key=lambda r: -abs(r[1]))


def _main(args, argv) -> int:
    if args.quick:
        args.warmup, args.steps = 1, 1
    config = args.method
    if not config.endswith(".yaml"):
        config = os.path.join(BCCD_CONFIG_DIR, METHOD_CONFIG_PATTERN.format(method=args.method))
    if not os.path.isfile(config):
        raise SystemExit(
            f"No config {config}: give a method preset name (configs/bccd/distill_<method>_R50_R18.yaml) or a path."
        )
    from d2kd import register_bccd

    register_bccd(datasets_dir())
    opts = merge_opts(QUICK_INPUT_OPTS if args.quick else [], ["MODEL.DEVICE", "cpu"], args.opts)
    cfg = load_config(config, opts)
    if args.quick:
        cfg.merge_from_list(["DISTILL.TEACHER.OPTS", [str(o) for o in QUICK_INPUT_OPTS]])
    with tempfile.TemporaryDirectory(prefix="d2kd_profile_") as tmpdir:
        weights, _ = overhead_steps.teacher_weights_for(cfg, "random", tmpdir, {})
        cfg.merge_from_list(["DISTILL.TEACHER.WEIGHTS", weights, "OUTPUT_DIR", tmpdir])
        per_op = profile_phases(cfg, args.warmup, args.steps)
    total = {k: sum(v.values()) for k, v in per_op.items()}
    print(
        f"{config}: self CPU ms per step (profiled, {args.steps} step(s)): student {total['student']:.0f}, "
        f"teacher {total['teacher']:.0f}, distill {total['distill']:.0f}; "
        f"distill - student - teacher = {total['distill'] - total['student'] - total['teacher']:+.0f}"
    )
    print(f"{'excess ms':>10}  {'student':>8} {'teacher':>8} {'distill':>8}  operator")
    for name, excess, s, t, d in overhead_by_operator(per_op)[: args.top]:
        print(f"{excess:+10.1f}  {s:8.1f} {t:8.1f} {d:8.1f}  {name}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_repo_root(_main, args, argv, ())


if __name__ == "__main__":
    sys.exit(main())
