#!/usr/bin/env python
"""
One-shot check of the GPU path: every Faster R-CNN and RetinaNet preset at COCO architectures,
in fp32, in mixed precision and with a bf16 teacher.

    python tools/gpu_check.py                                  # on a GPU machine, <= ~6 minutes
    python tools/gpu_check.py --teacher-weights R101.pkl --retinanet-teacher-weights R101_retina.pkl
    python tools/gpu_check.py --quick --device cpu --output-dir /tmp/gpu_check   # the test suite's run

For each preset ``configs/coco/distill_<head>_R101_R50.yaml`` and
``configs/coco/distill_<head>_retinanet_R101_R50.yaml`` (model-zoo R101-FPN teacher, R50-FPN
student; 800-pixel inputs, batch 2, BCCD images) and each mode

- ``fp32``: the plain fp32 step;
- ``amp``: the step under autocast (``--amp-precision``, float16 with a gradient scaler by
  default on CUDA as Detectron2's AMPTrainer; bfloat16 on a CPU), teacher included;
- ``bf16_teacher``: fp32 student and heads, the teacher under bf16 autocast
  (``DISTILL.TEACHER.PRECISION bf16``);

it times ``--iters`` steps (after ``--warmup``) of the three phases of benchmarks/overhead.py,
on the same batches: a plain student step, the teacher parts the heads ask for, the
distillation step (student + teacher + heads, backward, optimizer step), and records

- whether every loss term of every distillation step was finite;
- median step times (ms) and the overhead ratio ``t_distill / (t_student + t_teacher)``;
- the peak memory of each phase (kept tensors + transient peak; ``torch.cuda.max_memory_allocated``
  on a GPU) and the memory ratio ``mem_distill / (mem_student + mem_teacher)``;
- the AMP speed-up ``t_distill(fp32) / t_distill(amp)`` (and the bf16 teacher's).

Results: ``<output-dir>/gpu_check[_quick].json`` and ``.md`` (default output dir
benchmarks/results; ``--quick`` never writes there unless told to).

The teacher has random weights unless ``--teacher-weights`` / ``--retinanet-teacher-weights``
fit its architecture (timing and memory do not depend on the weights). The COCO-sized class
heads (80 classes) train on BCCD's 3 classes; ``DISTILL.TEACHER.CLASSES`` is set to BCCD's names
so the class-order check passes (a timing check, not a training run). GKD's prototypes are made
from a 16-image training subset. ``--time-budget`` stops starting new presets once that many
seconds have passed (the rest are listed as not run).

``--quick``: 2 presets (``fitnet``, ``fitnet_retinanet``), R18 student and teacher, 128-pixel
inputs, 1 warm-up + 2 timed steps: the CPU test of this script (tests/tools/test_gpu_check.py).
"""

import argparse
import gc
import glob
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # the benchmarks' shared `study` package

import torch  # noqa: E402

from study import (  # noqa: E402
    QUICK_INPUT_OPTS,
    command_string,
    datasets_dir,
    markdown_table,
    median,
    merge_opts,
    provenance,
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
)

SCRIPT = "tools/gpu_check.py"
COCO_DIR = os.path.join(REPO, "configs", "coco")
MODES = ("fp32", "amp", "bf16_teacher")
QUICK_PRESETS = ("fitnet", "fitnet_retinanet")
SUBSET = "gpu_check_bccd_train_16"
MB = 1024.0 * 1024.0
# 800-pixel inputs, batch 2, BCCD (the COCO presets' own INPUT sizes are 800 / 1333 already).
FULL_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MAX_SIZE_TRAIN", "1333",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()", "SOLVER.BASE_LR", "0.001",
    "SOLVER.CHECKPOINT_PERIOD", "100000", "DATALOADER.NUM_WORKERS", "0",
    "DISTILL.EVAL_TEACHER", "False", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]
TEACHER_FULL_OPTS = ["INPUT.MIN_SIZE_TEST", 800, "INPUT.MAX_SIZE_TEST", 1333]
# --quick: R18 student and teacher at 128 px (tiny, for the CPU test).
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
TEACHER_QUICK_OPTS = R18 + [
    "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help="preset names, e.g. fitnet kd_retinanet... (default: all; --quick: 2)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--iters", type=int, default=None, help="timed steps per phase and mode (default 20; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per phase and mode (default 2; --quick 1)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--amp-precision", default=None, help="float16 | bfloat16 (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--teacher-weights", default="random", help="Faster R-CNN R101-FPN teacher weights (default random)")
    p.add_argument("--retinanet-teacher-weights", default="random", help="RetinaNet R101-FPN teacher weights")
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds after which no new preset starts")
    p.add_argument("--output-dir", help="default benchmarks/results (--quick: a temporary folder is advised)")
    p.add_argument("--quick", action="store_true", help="CPU-sized smoke run: 2 presets, R18, 128 px, 1+2 steps")
    return p


def discover_presets():
    """``{name: config path}``: distill_<head>_R101_R50 (Faster R-CNN) and distill_<head>_retinanet_R101_R50."""
    out = OrderedDict()
    for path in sorted(glob.glob(os.path.join(COCO_DIR, "distill_*_R101_R50.yaml"))):
        name = os.path.basename(path)[len("distill_"):-len("_R101_R50.yaml")]
        if "mask_rcnn" not in name:
            out[name] = path
    return out


def preset_cfg(path, args, tmpdir):
    """The preset on BCCD, at the check's sizes (``--quick``: R18, 128 px)."""
    from d2kd.config import load_config
    from d2kd.data.builtin import BCCD_CLASSES

    quick = QUICK_INPUT_OPTS + R18 if args.quick else []
    opts = merge_opts(FULL_OPTS, quick, ["MODEL.DEVICE", args.device, "DATASETS.TRAIN", f"('{SUBSET}',)"])
    cfg = load_config(path, opts)
    cfg.defrost()
    cfg.DISTILL.TEACHER.OPTS = list(cfg.DISTILL.TEACHER.OPTS) + (TEACHER_QUICK_OPTS if args.quick else TEACHER_FULL_OPTS)
    cfg.DISTILL.TEACHER.CLASSES = list(BCCD_CLASSES)
    cfg.DISTILL.WARMUP_ITERS, cfg.DISTILL.STOP_ITER = 0, -1
    cfg.SOLVER.AMP.ENABLED = False  # the check applies autocast itself, per mode
    cfg.OUTPUT_DIR = os.path.join(tmpdir, os.path.basename(path)[: -len(".yaml")])
    return cfg


def _scaler(device, dtype):
    """A gradient scaler for float16 on CUDA (as Detectron2's AMPTrainer); a disabled one otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


class Step:
    """One training step (forward, backward, optimizer step), optionally under autocast with a scaler."""

    def __init__(self, model, optimizer, device, dtype=None, scaler=None):
        self.model, self.optimizer, self.device, self.dtype = model, optimizer, device, dtype
        self.scaler = scaler or _scaler(device, dtype)

    def __call__(self, batch):
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            losses = self.model(batch)
            loss = sum(losses.values())
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return losses


def _run_teacher(runner, batch, records, device, dtype):
    """The teacher parts the heads ask for, as the distillation step runs them (under the step's autocast)."""
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        runner(batch, records)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_preset(name, path, args, tmpdir, cache, batches_cache, student_cache, device, amp_dtype):
    """Rows of one preset: ``{mode: {...}}`` plus the preset's description."""
    from detectron2.utils.events import EventStorage

    cfg = preset_cfg(path, args, tmpdir)
    retina = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    given = args.retinanet_teacher_weights if retina else args.teacher_weights
    weights, note = teacher_weights_for(cfg, given, tmpdir, cache)
    cfg.DISTILL.TEACHER.WEIGHTS = weights
    key = (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.SOLVER.IMS_PER_BATCH)
    if key not in batches_cache:
        batches_cache[key] = take_batches(cfg, args.warmup + args.iters)
    batches = batches_cache[key]

    trainer, dm, distill_opt, it, hook_setup = build_distillation(cfg)
    dm.train()
    runner = dm.teacher_runner
    probe = MemoryProbe(device)
    # The plain student's step is the same for every preset of a student architecture: measured once per
    # (architecture, precision) and reused (the check has to fit in a few minutes).
    student_key = cfg.MODEL.dump() + repr((cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN))
    dtypes = {mode: amp_dtype if mode == "amp" else None for mode in args.modes}
    student = student_opt = None
    if any((student_key, dtypes[m]) not in student_cache for m in args.modes):
        student, student_opt = build_plain_student(cfg)
        dm.student.load_state_dict(student.state_dict())
    # Every mode starts from the same weights and empty optimizer states (random models drift fast).
    initial = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in (student, dm) if m is not None]
    modes = OrderedDict()
    with EventStorage(it) as storage:
        trainer.storage, trainer.iter = storage, it
        for mode in args.modes:
            for module, weights in initial:
                module.load_state_dict(weights)
            distill_opt.state = defaultdict(dict)
            dtype = dtypes[mode]
            runner.precision = "bf16" if mode == "bf16_teacher" else ""
            cached_student = student_cache.get((student_key, dtype))
            phases = {
                "teacher": lambda batch, records: _run_teacher(runner, batch, records, device, dtype),
                "distill": lambda batch, records: Step(dm, distill_opt, device, dtype, scaler)(batch),
            }
            scaler = _scaler(device, dtype)
            if cached_student is None:
                student_opt.state = defaultdict(dict)
                student_scaler = _scaler(device, dtype)
                phases["student"] = lambda batch, records: Step(student, student_opt, device, dtype, student_scaler)(batch)
            times = {p: [] for p in phases}
            bad_terms, kd_terms, error = set(), set(), None
            for k, batch in enumerate(batches):
                records = student_records(dm, batch) if runner.needs_student_records else None
                order = list(phases)
                order = order[k % len(order):] + order[: k % len(order)]  # no phase always first
                try:
                    for phase in order:
                        _sync(device)
                        start = time.perf_counter()
                        out = phases[phase](batch, records)
                        _sync(device)
                        if k >= args.warmup:
                            times[phase].append(time.perf_counter() - start)
                        if phase == "distill":
                            for term, value in out.items():
                                kd_terms.update([term] if term.startswith("loss_kd_") else [])
                                if not math.isfinite(float(value.detach().float())):
                                    bad_terms.add(term)
                except FloatingPointError as e:  # the detector's own divergence check
                    error = f"{phase}: {e}"
                    break
            if error:
                modes[mode] = OrderedDict(finite=False, non_finite_terms=sorted(bad_terms), error=error)
                continue
            # Peak memory: one more step per phase, outside the timed ones (the probe synchronises).
            peaks = {p: [] for p in phases}
            if probe.kind == "cuda":
                records = student_records(dm, batches[0]) if runner.needs_student_records else None
                for phase, fn in phases.items():
                    with probe.measure(peaks[phase]):
                        fn(batches[0], records)
            state = {"teacher": tensor_bytes(dm.teacher), "distill": tensor_bytes(dm, distill_opt, dm.teacher)}
            if cached_student is None:
                cached_student = student_cache[(student_key, dtype)] = {
                    "times": times["student"],
                    "peak": max(peaks["student"]) if peaks["student"] else None,
                    "state": tensor_bytes(student, student_opt),
                }
            times["student"] = cached_student["times"]
            peaks["student"] = [cached_student["peak"]] if cached_student["peak"] is not None else []
            state["student"] = cached_student["state"]
            med = {p: 1e3 * median(times[p]) for p in ("student", "teacher", "distill")}
            row = OrderedDict(
                time_ms=med,
                ratio=med["distill"] / (med["student"] + med["teacher"]),
                finite=not bad_terms and bool(kd_terms),
                non_finite_terms=sorted(bad_terms),
                kd_terms=len(kd_terms),
            )
            if probe.kind == "cuda":
                mem = {p: (state[p] + max(peaks[p])) / MB for p in ("student", "teacher", "distill")}
                row["memory_mb"] = mem
                row["memory_ratio"] = mem["distill"] / (mem["student"] + mem["teacher"])
            modes[mode] = row
    runner.precision = ""
    preset = OrderedDict(
        preset=name,
        config=os.path.relpath(path, REPO),
        detector="RetinaNet" if retina else "Faster R-CNN",
        heads=list(cfg.DISTILL.HEADS),
        teacher_parts=sorted(runner.parts),
        teacher=f"{cfg.DISTILL.TEACHER.CONFIG_FILE}: {note}",
        head_hook_setup_s=hook_setup,
        modes=modes,
    )
    fp32_ms = modes.get("fp32", {}).get("time_ms", {}).get("distill")
    for mode in ("amp", "bf16_teacher"):
        if fp32_ms and "time_ms" in modes.get(mode, {}):
            preset[f"{mode}_speedup"] = fp32_ms / modes[mode]["time_ms"]["distill"]
    return preset


def render_markdown(report) -> str:
    s = report["setup"]
    rows = []
    for p in report["presets"]:
        for mode, r in p["modes"].items():
            if "error" in r:
                rows.append([p["preset"], mode, f"✗ {r['error'][:80]}"] + [""] * 9)
                continue
            t, mem = r["time_ms"], r.get("memory_mb")
            speedup = p.get(f"{mode}_speedup")
            rows.append([
                p["preset"], mode, "✓" if r["finite"] else "✗ " + ", ".join(r["non_finite_terms"][:3]),
                f"{t['student']:.0f}", f"{t['teacher']:.0f}", f"{t['distill']:.0f}", f"{r['ratio']:.3f}",
                f"{mem['student']:.0f}" if mem else "n/a", f"{mem['teacher']:.0f}" if mem else "n/a",
                f"{mem['distill']:.0f}" if mem else "n/a", f"{r['memory_ratio']:.3f}" if mem else "n/a",
                f"{speedup:.2f}×" if speedup else "",
            ])
    lines = [
        "# GPU check: COCO-architecture presets in fp32, AMP and with a bf16 teacher",
        "",
        f"Device {s['device']}; inputs {s['min_size_train']} px (max {s['max_size_train']}), batch {s['ims_per_batch']} "
        f"BCCD images; {s['warmup']} warm-up + {s['iters']} timed steps per phase and mode, medians; AMP in "
        f"{s['amp_precision']}. Teachers: {'; '.join(s['teachers']) or '?'}.",
        "",
        "ratio = t_distill / (t_student + t_teacher). Memory (MB) = kept tensors + transient peak "
        "(torch.cuda.max_memory_allocated); mem ratio = mem_distill / (mem_student + mem_teacher). "
        "Speed-up = t_distill(fp32) / t_distill(mode).",
        "",
        markdown_table(
            ["Preset", "mode", "finite", "t_student ms", "t_teacher ms", "t_distill ms", "ratio",
             "mem student", "mem teacher", "mem distill", "mem ratio", "speed-up"],
            rows,
            align="lllrrrrrrrrr",
        ),
    ]
    if report["failed"]:
        lines += ["", "Failed: " + "; ".join(f"{k}: {v}" for k, v in report["failed"].items())]
    if report["not_run"]:
        lines += ["", f"Not run (time budget {s['time_budget_s']:.0f} s): {', '.join(report['not_run'])}"]
    prov = report["provenance"]
    lines += [
        "",
        f"Made by `{report['command']}` on {prov['date']}, commit {(prov['git'].get('commit') or '?')[:12]}"
        f"{' (with local changes)' if prov['git'].get('dirty') else ''}; torch {prov['torch']}; "
        f"{report['total_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu (with --quick) on a CPU machine.")
    from d2kd.engine.amp import parse_precision

    amp_dtype = parse_precision(args.amp_precision or ("float16" if device.type == "cuda" else "bfloat16"), "--amp-precision")
    if device.type == "cpu" and amp_dtype != torch.bfloat16:
        raise SystemExit("CPU autocast is bfloat16: --amp-precision bfloat16 on a CPU.")
    available = discover_presets()
    names = args.presets or (list(QUICK_PRESETS) if args.quick else list(available))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"Unknown presets {unknown}; available: {list(available)}")

    from d2kd import register_bccd
    from d2kd.data.subset import register_subset_dataset

    register_bccd(datasets_dir())
    register_subset_dataset(SUBSET, "bccd_train", 16)
    output_dir = args.output_dir or os.path.join(REPO, "benchmarks", "results")
    name = "gpu_check" + ("_quick" if args.quick else "")
    presets, failed, not_run, cache, batches_cache, student_cache = [], OrderedDict(), [], {}, {}, {}
    print(f"GPU check on {device}: {len(names)} presets x modes {args.modes}, {args.warmup}+{args.iters} steps.", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2kd_gpu_check_") as tmpdir:
        for i, preset in enumerate(names):
            if time.time() - start > args.time_budget:
                not_run = names[i:]
                print(f"Time budget of {args.time_budget:.0f} s spent: not running {not_run}.", flush=True)
                break
            t0 = time.time()
            try:
                row = check_preset(
                    preset, available[preset], args, tmpdir, cache, batches_cache, student_cache, device, amp_dtype
                )
            except Exception as e:  # one broken preset must not hide the others
                failed[preset] = f"{type(e).__name__}: {e}"
                print(f"[{i + 1}/{len(names)}] {preset}: FAILED ({failed[preset]})", flush=True)
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            presets.append(row)
            summary = ", ".join(
                f"{m} FAILED ({r['error']})" if "error" in r else
                f"{m} {r['time_ms']['distill']:.0f} ms ratio {r['ratio']:.2f}{'' if r['finite'] else ' NON-FINITE'}"
                for m, r in row["modes"].items()
            )
            print(f"[{i + 1}/{len(names)}] {preset} ({time.time() - t0:.0f} s): {summary}", flush=True)
    cfg = preset_cfg(available[names[0]], args, tempfile.gettempdir())
    report = OrderedDict(
        benchmark="gpu_check",
        command=command_string(SCRIPT, argv),
        provenance=provenance(str(device)),
        setup=OrderedDict(
            device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            min_size_train=list(cfg.INPUT.MIN_SIZE_TRAIN),
            max_size_train=int(cfg.INPUT.MAX_SIZE_TRAIN),
            ims_per_batch=int(cfg.SOLVER.IMS_PER_BATCH),
            warmup=args.warmup,
            iters=args.iters,
            modes=list(args.modes),
            amp_precision=str(amp_dtype).replace("torch.", ""),
            teachers=sorted({p["teacher"] for p in presets}),
            time_budget_s=args.time_budget,
        ),
        presets=presets,
        failed=failed,
        not_run=not_run,
        all_finite=bool(presets) and all(r["finite"] for p in presets for r in p["modes"].values()),
        total_s=time.time() - start,
    )
    json_path, md_path = os.path.join(output_dir, name + ".json"), os.path.join(output_dir, name + ".md")
    write_json(json_path, report)
    write_text(md_path, render_markdown(report))
    print(render_markdown(report))
    print(f"Wrote {json_path} and {md_path}")
    return 0 if report["all_finite"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
