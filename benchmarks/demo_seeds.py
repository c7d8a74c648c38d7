#!/usr/bin/env python
"""
The demo's gain over seeds: `make demo` (tools/demo.py) trains its baseline and distilled student
at one SEED; this script trains both for each of ``--seeds`` (default 0 1 2) with the demo's
configs, reusing one teacher and every run already trained (the demo's own seed included), and
writes a Markdown report: each seed's AP of both students, and the paired ΔAP (distilled minus
baseline at the same seed: same initialisation, image order and flips) as mean ± sample std.

    python benchmarks/demo_seeds.py        # writes benchmarks/results/demo_seeds.md
                                           # (3 x about 9 minutes on 2 cores, plus the teacher once)
    python benchmarks/demo_seeds.py --quick --output /tmp/demo_seeds.md   # the plumbing, in about a minute

--quick trains the demo's --quick runs (2 iterations, 96 px, 3 test images) under
output/demo_quick and never writes into benchmarks/results.
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))
import demo  # noqa: E402  (tools/demo.py)
from study.common import cpu_name  # noqa: E402  (benchmarks/study, beside this script)

RESULTS = os.path.join(HERE, "results")
DEFAULT_OUTPUT = os.path.join(RESULTS, "demo_seeds.md")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher-config", default=demo.DEFAULT_TEACHER_CONFIG)
    p.add_argument("--distill-config", default=demo.DEFAULT_DISTILL_CONFIG)
    p.add_argument("--output-root", default=None,
                   help=f"folder of the runs (default: {demo.DEFAULT_OUTPUT_ROOT}, the demo's; "
                   "--quick: output/demo_quick)")
    p.add_argument("--output", default=None,
                   help="the Markdown report (default: benchmarks/results/demo_seeds.md; --quick: "
                   "<output-root>/demo_seeds.md)")
    p.add_argument("--quick", action="store_true", help="the demo's --quick runs: checks the plumbing only")
    return p


def _mean_std(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _pm(values, signed=False):
    mean, std = _mean_std(values)
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


def _schedule(run):
    cfg = demo._build_cfg(run.config_file, run.opts)
    return int(cfg.SOLVER.MAX_ITER), int(cfg.INPUT.MIN_SIZE_TEST)




def _shown(path):
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def render(args, argv, teacher, per_seed, wall_min):
    """The report: ``per_seed`` is [(seed, baseline metrics, distilled metrics)]."""
    t = demo.box_metrics(teacher.results())
    base_run, dist_run = per_seed[0][3], per_seed[0][4]
    t_iters, size = _schedule(teacher)
    s_iters, _ = _schedule(dist_run)
    heads = demo.heads_label(args.distill_config)
    deltas = {k: [d[k] - b[k] for _, b, d, _, _ in per_seed] for k in demo.METRICS}
    wins = sum(1 for x in deltas["AP"] if x > 0)
    command = "python benchmarks/demo_seeds.py" + ("" if not argv else " " + shlex.join(argv))
    split = (f"the first {demo.QUICK_TEST_IMAGES} images of {demo.TEST_SET}" if args.quick
             else f"{demo.TEST_SET} (72 images)")
    lines = [
        "# The demo over seeds" + (" (--quick: plumbing only, the numbers mean nothing)" if args.quick else ""),
        "",
        f"`make demo`'s runs (`{args.teacher_config}`, `{args.distill_config}`) for SEED "
        f"{', '.join(str(s) for s, *_ in per_seed)}: teacher R50-FPN {t_iters} iterations (trained once), "
        f"students R18-FPN {s_iters} iterations, the baseline with `DISTILL.HEADS []` and the distilled one with "
        f"{heads}; short side {size}. COCO-style box AP (%) on {split}. Paired Δ: distilled minus baseline "
        "at the same seed (same initialisation, image order and flips), mean ± sample std over the seeds.",
        "",
        f"Measured {datetime.date.today().isoformat()} on {cpu_name()} "
        f"({os.cpu_count()} cores seen), {wall_min:.1f} minutes in all (runs already trained were reused). Command:",
        "",
        f"    {command}",
        "",
        "| seed | baseline AP | AP50 | AP75 | distilled AP | AP50 | AP75 | ΔAP | ΔAP50 | ΔAP75 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for seed, b, d, _, _ in per_seed:
        cells = [f"{b[k]:.1f}" for k in demo.METRICS] + [f"{d[k]:.1f}" for k in demo.METRICS]
        cells += [f"{d[k] - b[k]:+.1f}" for k in demo.METRICS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    mean_b = [_pm([b[k] for _, b, *_ in per_seed]) for k in demo.METRICS]
    mean_d = [_pm([d[k] for _, _, d, *_ in per_seed]) for k in demo.METRICS]
    mean_delta = [f"**{_pm(deltas[k], signed=True)}**" if k == "AP" else _pm(deltas[k], signed=True)
                  for k in demo.METRICS]
    lines.append("| mean ± std | " + " | ".join(mean_b + mean_d + mean_delta) + " |")
    lines += [
        "",
        f"Teacher: AP {t['AP']:.1f}, AP50 {t['AP50']:.1f}, AP75 {t['AP75']:.1f}.",
        f"The distilled student beats its baseline at {wins} of {len(per_seed)} seeds; paired ΔAP "
        f"{_pm(deltas['AP'], signed=True)} (min {min(deltas['AP']):+.1f}, max {max(deltas['AP']):+.1f}).",
        "",
        f"Runs: {_shown(teacher.output_dir)}, {_shown(os.path.dirname(base_run.output_dir))}/"
        "{baseline,distilled}_seed<N>.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.chdir(REPO)
    output_root = os.path.abspath(args.output_root or ("output/demo_quick" if args.quick else demo.DEFAULT_OUTPUT_ROOT))
    default_output = os.path.join(output_root, "demo_seeds.md") if args.quick else DEFAULT_OUTPUT
    output = os.path.abspath(args.output or default_output)
    if args.quick and os.path.commonpath([output, RESULTS]) == RESULTS:
        raise SystemExit("--quick does not write into benchmarks/results: pass --output elsewhere.")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    if args.quick:
        import torch

        torch.set_num_threads(1)
    start = time.time()
    per_seed = []
    teacher = None
    for seed in args.seeds:
        teacher, baseline, distilled = demo.demo_runs(
            args.teacher_config, args.distill_config, seed, args.quick, output_root
        )
        for run in (teacher, baseline, distilled) if not per_seed else (baseline, distilled):
            demo.ensure_run(run)
        b, d = demo.box_metrics(baseline.results()), demo.box_metrics(distilled.results())
        per_seed.append((seed, b, d, baseline, distilled))
        delta = d["AP"] - b["AP"]
        print(f"[seed {seed}] baseline AP {b['AP']:.1f}, distilled AP {d['AP']:.1f}, Δ {delta:+.1f}", flush=True)
    report = render(args, argv, teacher, per_seed, (time.time() - start) / 60)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        f.write(report)
    print("\n" + report)
    print(f"Wrote {output}")
    return output


if __name__ == "__main__":
    main()
