#!/usr/bin/env python
"""
What the student buys: teacher (R50-FPN) vs student (R18-FPN) inference time per image,
parameters and FLOPs, on BCCD test images.

    python benchmarks/speed.py                     # 50 timed images, batch 1, CPU (GPU if present)
    python benchmarks/speed.py --images 100 --threads 2
    python benchmarks/speed.py --quick --output-dir /tmp/q

Timing: batch 1, eval mode, ``torch.no_grad``, the test-time input pipeline of each model's
config (short side 320 for BCCD), after warm-up; teacher and student alternate image by image
so background load affects both alike; median, 25th/75th percentiles. Post-processing
(NMS, box decoding) is included, data loading is not.

FLOPs: ``detectron2.utils.analysis.FlopCountAnalysis`` (fvcore; one fused multiply-add counts
as one flop), mean over ``--flop-images`` BCCD images, total and per top-level module.
Unsupported ops (e.g. NMS) are not counted. Weights: the trained ones when present (teacher
at DISTILL.TEACHER.WEIGHTS, student at its OUTPUT_DIR/model_final.pth or the accuracy study's
baseline), else random; inference time of a random detector can differ slightly (the
number of boxes after the score threshold differs), which the output states.
"""

import argparse
import itertools
import os
import sys
import time
from collections import OrderedDict

# The study package beside this script, and d2kd from a checkout that is not installed.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from d2kd.config import load_config  # noqa: E402
from study import (  # noqa: E402
    BCCD_CONFIG_DIR,
    QUICK_INPUT_OPTS,
    RESULTS_DIR,
    STUDENT_CONFIG,
    command_string,
    datasets_dir,
    markdown_table,
    median,
    merge_opts,
    percentile,
    provenance,
    repo_path,
    run_from_repo_root,
    write_json,
    write_text,
)

SCRIPT = "benchmarks/speed.py"
BASELINE_RUN = "output/benchmarks/bccd_accuracy/baseline/seed0/model_final.pth"


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, help="timed images (default 50; --quick 2)")
    p.add_argument("--warmup", type=int, help="untimed images first (default 5; --quick 1)")
    p.add_argument("--flop-images", type=int, help="images averaged for FLOPs (default 3; --quick 1)")
    p.add_argument("--dataset", default="bccd_test", help="registered dataset the images come from")
    p.add_argument(
        "--teacher-config", help="default: DISTILL.TEACHER.CONFIG_FILE of configs/bccd/Base-distill-R50-R18.yaml"
    )
    p.add_argument("--student-config", default=STUDENT_CONFIG)
    p.add_argument("--teacher-weights", default=None, help="auto (default), random (--quick default), or a path")
    p.add_argument("--student-weights", default=None, help="auto (default), random (--quick default), or a path")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; --quick: 1)")
    p.add_argument("--output-dir", help="default benchmarks/results (--quick: output/benchmarks/quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 128 px, 1+2 images, 1 FLOP image")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for both models")
    return p


def resolve_weights(choice, candidates):
    """(path or '', description) for 'auto' / 'random' / a path."""
    if choice == "random":
        return "", "random initialisation"
    if choice not in (None, "auto"):
        if not os.path.isfile(choice):
            raise SystemExit(f"Weights file not found: {choice}")
        return choice, choice
    for path in candidates:
        if path and os.path.isfile(path):
            return path, path
    return "", "random initialisation (no trained weights found at " + ", ".join(c for c in candidates if c) + ")"


def build(cfg, weights):
    from detectron2.modeling import build_model

    from d2kd.files import SafeDetectionCheckpointer

    torch.manual_seed(0)
    model = build_model(cfg)
    if weights:
        SafeDetectionCheckpointer(model).load(weights)
    model.eval()
    return model


def count_params(model):
    out = OrderedDict(total=sum(p.numel() for p in model.parameters()))
    for name, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            out[name] = n
    return out


def count_flops(model, inputs_list):
    """Mean fvcore FLOPs (multiply-adds) over the given single-image inputs, total and per module."""
    from detectron2.utils.analysis import FlopCountAnalysis

    totals, per_module, unsupported = [], {}, set()
    for inputs in inputs_list:
        analysis = FlopCountAnalysis(model, [inputs])
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        totals.append(analysis.total())
        by_module = analysis.by_module()  # the model is traced inside an adapter: names start "model."
        for name in list(dict(model.named_children())):
            per_module.setdefault(name, []).append(by_module.get("model." + name, by_module.get(name, 0)))
        unsupported.update(analysis.unsupported_ops())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    flops = OrderedDict(total=mean(totals), **{k: mean(v) for k, v in per_module.items() if mean(v)})
    return flops, sorted(unsupported)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _test_inputs(cfg, dataset, n):
    from detectron2.data import build_detection_test_loader

    loader = build_detection_test_loader(cfg, dataset)
    return [batch[0] for batch in itertools.islice(iter(loader), n)]


def _main(args, argv) -> int:
    q = args.quick
    args.images = args.images if args.images is not None else (2 if q else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.flop_images = args.flop_images if args.flop_images is not None else 1 if q else 3
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    output_dir = args.output_dir or ("output/benchmarks/quick" if q else RESULTS_DIR)
    name = "speed" + ("_quick" if q else "")

    from d2kd import register_bccd

    register_bccd(datasets_dir())
    distill_base = load_config(os.path.join(BCCD_CONFIG_DIR, "Base-distill-R50-R18.yaml"))
    teacher_config = args.teacher_config or repo_path(distill_base.DISTILL.TEACHER.CONFIG_FILE)
    opts = merge_opts(QUICK_INPUT_OPTS if q else [], ["MODEL.DEVICE", str(device)], args.opts)
    cfgs = OrderedDict(teacher=load_config(teacher_config, opts), student=load_config(args.student_config, opts))
    default = "random" if q else "auto"
    weights = OrderedDict(
        teacher=resolve_weights(args.teacher_weights or default, [distill_base.DISTILL.TEACHER.WEIGHTS]),
        student=resolve_weights(
            args.student_weights or default,
            [os.path.join(cfgs["student"].OUTPUT_DIR, "model_final.pth"), BASELINE_RUN],
        ),
    )
    models = OrderedDict((k, build(cfgs[k], weights[k][0])) for k in cfgs)
    n = args.warmup + max(args.images, args.flop_images)
    inputs = OrderedDict((k, _test_inputs(cfgs[k], args.dataset, n)) for k in cfgs)
    if len(inputs["student"]) < args.warmup + args.images:
        raise SystemExit(f"{args.dataset} has only {len(inputs['student'])} images; lower --images/--warmup.")
    print(
        f"Speed on {device} with {torch.get_num_threads()} thread(s): {args.warmup} warm-up + {args.images} timed "
        f"images of {args.dataset}, batch 1; weights: " + "; ".join(f"{k} {w[1]}" for k, w in weights.items()),
        flush=True,
    )

    times = {k: [] for k in models}
    with torch.no_grad():
        for i in range(args.warmup + args.images):
            order = list(models) if i % 2 == 0 else list(models)[::-1]
            for k in order:
                _sync(device)
                start = time.perf_counter()
                models[k]([inputs[k][i]])
                _sync(device)
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - start)

    rows = OrderedDict()
    for k, model in models.items():
        image = inputs[k][0]
        flops, not_counted = count_flops(model, inputs[k][: args.flop_images])
        rows[k] = OrderedDict(
            config=teacher_config if k == "teacher" else args.student_config,
            weights=weights[k][1],
            depth=int(cfgs[k].MODEL.RESNETS.DEPTH),
            input_hw=list(image["image"].shape[-2:]),
            time_ms=OrderedDict(
                median=1e3 * median(times[k]),
                p25=1e3 * percentile(times[k], 25),
                p75=1e3 * percentile(times[k], 75),
                mean=1e3 * sum(times[k]) / len(times[k]),
                n=len(times[k]),
            ),
            images_per_s=1.0 / median(times[k]),
            params=count_params(model),
            gflops=OrderedDict((m, v / 1e9) for m, v in flops.items()),
            ops_not_counted=not_counted,
        )
    t, s = rows["teacher"], rows["student"]
    summary = OrderedDict(
        speedup=t["time_ms"]["median"] / s["time_ms"]["median"],
        params_ratio=s["params"]["total"] / t["params"]["total"],
        backbone_params_ratio=s["params"].get("backbone", 0) / max(t["params"].get("backbone", 0), 1),
        gflops_ratio=s["gflops"]["total"] / t["gflops"]["total"],
        backbone_gflops_ratio=s["gflops"].get("backbone", 0) / max(t["gflops"].get("backbone", 0), 1e-12),
    )
    report = OrderedDict(
        benchmark="speed",
        command=command_string(SCRIPT, argv),
        provenance=provenance(str(device)),
        setup=OrderedDict(
            device=str(device),
            dataset=args.dataset,
            warmup=args.warmup,
            images=args.images,
            flop_images=args.flop_images,
            batch=1,
            min_size_test=int(cfgs["student"].INPUT.MIN_SIZE_TEST),
            max_size_test=int(cfgs["student"].INPUT.MAX_SIZE_TEST),
            opts=opts,
        ),
        models=rows,
        student_vs_teacher=summary,
    )
    json_path, md_path = os.path.join(output_dir, name + ".json"), os.path.join(output_dir, name + ".md")
    write_json(json_path, report)
    md = render_markdown(report)
    write_text(md_path, md)
    print(md)
    print(f"Wrote {json_path} and {md_path}")
    return 0


def render_markdown(report: dict) -> str:
    rows = []
    for k, r in report["models"].items():
        rows.append(
            [
                f"{k} (R{r['depth']}-FPN)",
                f"{r['params']['total'] / 1e6:.2f}",
                f"{r['params'].get('backbone', 0) / 1e6:.2f}",
                f"{r['gflops']['total']:.1f}",
                f"{r['gflops'].get('backbone', 0):.1f}",
                f"{r['time_ms']['median']:.0f} ({r['time_ms']['p25']:.0f}–{r['time_ms']['p75']:.0f})",
                f"{r['images_per_s']:.2f}",
            ]
        )
    sm = report["student_vs_teacher"]
    rows.append(
        [
            "student / teacher",
            f"{sm['params_ratio']:.2f}×",
            f"{sm['backbone_params_ratio']:.2f}×",
            f"{sm['gflops_ratio']:.2f}×",
            f"{sm['backbone_gflops_ratio']:.2f}×",
            f"{1 / sm['speedup']:.2f}× (speed-up {sm['speedup']:.2f}×)",
            "",
        ]
    )
    s, p = report["setup"], report["provenance"]
    return "\n".join(
        [
            "# Inference cost: teacher vs student (BCCD)",
            "",
            f"Batch 1 on {s['device']} ({p['cpu'] if s['device'] == 'cpu' else p.get('gpu', s['device'])}, "
            f"{p['torch_threads']} thread(s)), {s['images']} images of `{s['dataset']}` after {s['warmup']} warm-up, "
            f"test size {s['min_size_test']}/{s['max_size_test']}; median (25th–75th percentile). GFLOPs by fvcore "
            f"(1 multiply-add = 1 flop; NMS not counted), mean over {s['flop_images']} image(s). Weights: "
            + "; ".join(f"{k}: {r['weights']}" for k, r in report["models"].items())
            + ".",
            "",
            markdown_table(
                ["Model", "params (M)", "backbone params (M)", "GFLOPs", "backbone GFLOPs", "ms / image", "images / s"],
                rows,
                align="lrrrrrr",
            ),
            f"Made by `{report['command']}` on {p['date']}, commit {(p['git'].get('commit') or '?')[:12]}"
            f"{' (with local changes)' if p['git'].get('dirty') else ''}; torch {p['torch']}.",
            "",
        ]
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_from_repo_root(_main, args, argv, ("output_dir", "teacher_weights", "student_weights"))


if __name__ == "__main__":
    sys.exit(main())
