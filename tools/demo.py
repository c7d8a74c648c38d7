#!/usr/bin/env python
"""
The main job (`make demo`): on the embedded BCCD data, train a small teacher, a student without
distillation (the baseline) and the same student distilled from the teacher (same config and
SEED, only DISTILL.HEADS differs), evaluate the three on bccd_test, print their AP in one table
and draw two pictures:

    output/demo/detections.png   ground truth | teacher | baseline | distilled on a few test images
    output/demo/curves.png       detector losses of the three runs and every distillation term

    python tools/demo.py                  # the demo configs (configs/bccd/demo/)
    python tools/demo.py --seed 1         # another student seed (the teacher is reused)
    python tools/demo.py --quick --output-root /tmp/demo   # a few iterations on tiny inputs (tests)
    python tools/demo.py --teacher-config configs/bccd/teacher_R50_FPN.yaml \\
        --distill-config configs/bccd/distill_chen2017_R50_R18.yaml     # the full-size pair

A run is reused when its folder holds model_final.pth and eval_results.json and its config.yaml
matches what the demo would train; an interrupted run is resumed; a run whose config changed is
trained again (the old files move to its previous_runs/); a distilled run older than its
teacher's weights is trained again too. From scratch the demo trains 120 + 90 + 90 iterations:
about 21 minutes expected on 2 idle CPU cores (teacher 10, baseline about 4.5, distilled about
6.5; see configs/bccd/demo/), about 15 seconds to reprint and redraw when everything is reused.

Training runs through train_net.py, so its progress (iteration, losses, ETA) is shown as it goes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
for _path in (REPO, TOOLS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

DEFAULT_TEACHER_CONFIG = "configs/bccd/demo/teacher_demo.yaml"
DEFAULT_DISTILL_CONFIG = "configs/bccd/demo/distill_demo.yaml"
DEFAULT_OUTPUT_ROOT = "output/demo"
TEST_SET = "bccd_test"
# `--quick`: the plumbing of the demo in well under a minute (tests); the numbers mean nothing.
QUICK_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "SOLVER.CHECKPOINT_PERIOD", "100000",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "DATALOADER.NUM_WORKERS", "0",
]
QUICK_TEST_IMAGES = 3
QUICK_PICTURE_IMAGES = 2
METRICS = ("AP", "AP50", "AP75")


# ---------------------------------------------------------------------------------------
# Runs: train (or reuse, or resume) through train_net.py
# ---------------------------------------------------------------------------------------


class Run:
    """One train_net.py run of the demo: its config file, overrides and folder."""

    def __init__(self, name, config_file, output_dir, opts=(), test_images=0, inputs=(), threads=0):
        self.name = name
        self.config_file = config_file
        self.output_dir = output_dir
        self.test_images = int(test_images)
        self.inputs = list(inputs)  # files the run was trained from (the teacher's weights)
        self.threads = int(threads)  # OMP_NUM_THREADS of its process (0: torch's default)
        opts = [str(x) for x in opts]
        if self.test_images:
            opts += ["DATASETS.TEST", f"('{subset_name(self.test_images)}',)"]
        self.opts = opts + ["OUTPUT_DIR", output_dir]

    @property
    def weights(self):
        return os.path.join(self.output_dir, "model_final.pth")

    @property
    def results_file(self):
        return os.path.join(self.output_dir, "eval_results.json")

    def expected_config(self):
        """The config train_net.py would run (and write to OUTPUT_DIR/config.yaml), as a dict."""
        import yaml

        with _datasets_registered(self.test_images):
            return yaml.safe_load(_build_cfg(self.config_file, self.opts).dump())

    def config_changes(self):
        """Top-level keys whose values differ from the run's config.yaml (empty: same, or no file)."""
        import yaml

        path = os.path.join(self.output_dir, "config.yaml")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            found = yaml.safe_load(f) or {}
        expected = self.expected_config()
        if (found.get("MODEL") or {}).get("WEIGHTS") == self.weights:  # written by an --eval-only of this run
            found["MODEL"]["WEIGHTS"] = expected["MODEL"]["WEIGHTS"]
        found["OUTPUT_DIR"] = expected["OUTPUT_DIR"]  # the same folder, named relatively or not
        return sorted(_diff_keys(expected, found))

    def results(self):
        with open(self.results_file) as f:
            return json.load(f)

    @property
    def stamp_file(self):
        return os.path.join(self.output_dir, "demo_inputs.json")

    def input_stamps(self):
        """Size and modification time of each of ``inputs``."""
        stamps = {}
        for path in self.inputs:
            st = os.stat(path)
            stamps[path] = [st.st_size, st.st_mtime_ns]
        return stamps

    def inputs_changed(self):
        """Whether an input (the teacher) was trained again after this run (no stamp: unknown, False)."""
        if not self.inputs or not os.path.isfile(self.stamp_file):
            return False
        with open(self.stamp_file) as f:
            return json.load(f) != self.input_stamps()

    def write_stamp(self):
        if self.inputs:
            with open(self.stamp_file, "w") as f:
                json.dump(self.input_stamps(), f, indent=2)


def subset_name(num_images):
    return f"{TEST_SET}_first{int(num_images)}"


def _diff_keys(a, b, prefix=""):
    """Keys whose values differ; a key only one side has (a config extension registered in one
    process and not the other, a newer d2kd's option) is not a change of what was trained."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) & set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class _datasets_registered:
    """BCCD (and the --quick test subset) registered in this process."""

    def __init__(self, test_images=0):
        self.test_images = test_images

    def __enter__(self):
        register_datasets(self.test_images)

    def __exit__(self, *exc):
        return False


def register_datasets(test_images=0):
    from d2kd import register_bccd
    from d2kd.data import datasets_root

    register_bccd(datasets_root(default=os.path.join(REPO, "datasets")))
    if test_images:
        from d2kd.data.subset import register_subset_dataset

        register_subset_dataset(subset_name(test_images), TEST_SET, test_images)


def _build_cfg(config_file, opts=()):
    from d2kd import get_distill_cfg
    from d2kd.config import merge_config

    cfg = get_distill_cfg()
    merge_config(cfg, config_file, list(opts))
    return cfg


def _config_value(config_file, *keys):
    cfg = _build_cfg(config_file)
    for key in keys:
        cfg = cfg[key]
    return cfg


# train_net.py with the --quick test subset registered first (a subprocess does not see the
# datasets registered here).
_SUBSET_BOOTSTRAP = (
    "import runpy, sys; sys.path.insert(0, {tools!r}); import demo; demo.register_datasets({n}); "
    "sys.argv = [{train_net!r}] + sys.argv[1:]; runpy.run_path({train_net!r}, run_name='__main__')"
)


def _train_net(run, extra_args):
    train_net = os.path.join(REPO, "train_net.py")
    args = list(extra_args) + ["--config-file", run.config_file] + run.opts
    if run.test_images:
        code = _SUBSET_BOOTSTRAP.format(tools=TOOLS, n=run.test_images, train_net=train_net)
        cmd = [sys.executable, "-c", code] + args
        note = f"(DATASETS.TEST: the first {run.test_images} images of {TEST_SET})"
        shown = ["python", "train_net.py"] + args + [note]
    else:
        cmd = [sys.executable, train_net] + args
        shown = ["python", "train_net.py"] + args
    env = dict(os.environ, OMP_NUM_THREADS=str(run.threads)) if run.threads else None
    print(f"\n[{run.name}] $ {' '.join(shown)}", flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    print(f"[{run.name}] done in {(time.time() - start) / 60:.1f} min", flush=True)


def ensure_run(run):
    """
    Train ``run`` unless its folder holds model_final.pth and eval_results.json of the same
    config; evaluate a finished run that has no results; resume an interrupted one; train again
    (``--overwrite``) when the config changed. Returns ``"reused"``, ``"evaluated"`` or ``"trained"``.
    """
    changes = run.config_changes()
    if changes or run.inputs_changed():
        shown = ", ".join(changes[:6]) + (" ..." if len(changes) > 6 else "")
        why = f"another config ({shown})" if changes else f"an earlier {' and '.join(run.inputs)}"
        print(f"[{run.name}] {run.output_dir} was trained with {why}: training again", flush=True)
        _train_net(run, ["--overwrite"])
        run.write_stamp()
        return "trained"
    if os.path.isfile(run.weights):
        if os.path.isfile(run.results_file):
            print(f"[{run.name}] reusing {run.output_dir} (model_final.pth, eval_results.json)", flush=True)
            return "reused"
        run_eval = Run(run.name, run.config_file, run.output_dir, test_images=run.test_images, threads=run.threads)
        run_eval.opts = run.opts + ["MODEL.WEIGHTS", run.weights]
        _train_net(run_eval, ["--eval-only"])
        return "evaluated"
    resume = os.path.isfile(os.path.join(run.output_dir, "last_checkpoint"))
    _train_net(run, ["--resume"] if resume else ["--overwrite"])
    run.write_stamp()
    return "trained"


def demo_runs(teacher_config, distill_config, seed=None, quick=False, output_root=DEFAULT_OUTPUT_ROOT):
    """The teacher, baseline and distilled :class:`Run` of the demo (nothing is trained here)."""
    base = list(QUICK_OPTS) if quick else []
    test_images = QUICK_TEST_IMAGES if quick else 0
    # --quick: one thread per process; tiny models gain nothing from more, and OpenMP's
    # spin-waiting costs a lot on cores shared with other jobs.
    threads = 1 if quick else 0
    if seed is None:
        seed = int(_config_value(distill_config, "SEED"))
    teacher_dir = os.path.join(output_root, os.path.basename(_config_value(teacher_config, "OUTPUT_DIR").rstrip("/")))
    teacher = Run("teacher", teacher_config, teacher_dir, base, test_images, threads=threads)
    # The student's teacher is the run trained here, described by the run's own config.yaml.
    student = base + ["SEED", seed, "DISTILL.EVAL_TEACHER", "False"]
    baseline = Run("baseline", distill_config, os.path.join(output_root, f"baseline_seed{seed}"),
                   student + ["DISTILL.HEADS", "[]"], test_images, threads=threads)
    distilled = Run(
        "distilled",
        distill_config,
        os.path.join(output_root, f"distilled_seed{seed}"),
        student + ["DISTILL.TEACHER.CONFIG_FILE", os.path.join(teacher_dir, "config.yaml"),
                   "DISTILL.TEACHER.WEIGHTS", teacher.weights],
        test_images,
        inputs=[teacher.weights],
        threads=threads,
    )
    return teacher, baseline, distilled


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


def box_metrics(results):
    """``{AP, AP50, AP75}`` of a run's eval_results.json (its ``bbox`` entry; NaN where missing)."""
    bbox = results.get("bbox", {})
    return {k: float(bbox.get(k, float("nan"))) for k in METRICS}


def format_table(rows):
    """``rows``: (label, metrics, delta AP or None) -> a Markdown table."""
    lines = ["| model | AP | AP50 | AP75 | ΔAP vs baseline |", "|:---|---:|---:|---:|---:|"]
    for label, m, delta in rows:
        cells = [f"{m[k]:.1f}" for k in METRICS] + ["–" if delta is None else f"{delta:+.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heads_label(config_file):
    cfg = _build_cfg(config_file)
    heads = list(cfg.DISTILL.HEADS)
    label = " + ".join(heads) if heads else "no heads"
    if "chen2017" in heads and not cfg.DISTILL.CHEN2017.HINT.ENABLED:
        label += ", no hints"
    return label


def table_rows(teacher, baseline, distilled, distill_config):
    t, b, d = (box_metrics(r.results()) for r in (teacher, baseline, distilled))
    return [
        ("teacher", t, None),
        ("baseline (student, no distillation)", b, None),
        (f"distilled (student, {heads_label(distill_config)})", d, d["AP"] - b["AP"]),
    ]


# ---------------------------------------------------------------------------------------
# The pictures
# ---------------------------------------------------------------------------------------


def load_run_model(run):
    """The model of a finished run (its config.yaml and model_final.pth) and that config."""
    import torch
    from visualize_detections import load_student

    cfg = _build_cfg(os.path.join(run.output_dir, "config.yaml"))
    cfg.MODEL.DEVICE = cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu"
    cfg.freeze()
    return load_student(cfg, run.weights), cfg


def pick_images(dataset_dicts, count):
    """The first ``count`` images showing every class (then any), for a picture that shows them all."""
    classes = {a["category_id"] for d in dataset_dicts for a in d.get("annotations", [])}
    full = [d for d in dataset_dicts if {a["category_id"] for a in d.get("annotations", [])} == classes]
    rest = [d for d in dataset_dicts if d not in full]
    return (full + rest)[:count]


def draw_detections(runs, output, num_images=3, score_thresh=0.5):
    """
    One PNG: a row per test image of ``TEST_SET``, panels ground truth | one per run of ``runs``
    ((title, Run) pairs), drawn with tools/visualize_detections.py.
    """
    import cv2
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from visualize_detections import draw_panel, predict

    register_datasets()
    models = [(title, *load_run_model(run)) for title, run in runs]
    metadata = MetadataCatalog.get(TEST_SET)
    rows = []
    for d in pick_images(DatasetCatalog.get(TEST_SET), num_images):
        image_bgr = read_image(d["file_name"], format="BGR")
        image_rgb = image_bgr[:, :, ::-1]
        panels = [draw_panel(image_rgb, metadata, "ground truth", dataset_dict=d)]
        for title, model, cfg in models:
            instances = predict(model, cfg, image_bgr)
            panels.append(draw_panel(image_rgb, metadata, title, instances, score_thresh=score_thresh))
        rows.append(_hstack(panels))
    grid = _vstack(rows)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if not cv2.imwrite(output, np.ascontiguousarray(grid[:, :, ::-1])):
        raise OSError(f"Could not write {output}.")
    return output


def _hstack(panels, gap=8):
    import numpy as np

    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    return np.concatenate([x for p in padded for x in (p, spacer)][:-1], axis=1)


def _vstack(rows, gap=8):
    import numpy as np

    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    spacer = np.full((gap, width, 3), 255, dtype=np.uint8)
    return np.concatenate([x for r in padded for x in (r, spacer)][:-1], axis=0)


def plot_curves(runs, output, smooth=1):
    """
    One PNG of the runs' metrics.json (read with tools/plot_metrics.py): a panel per detector
    loss and their sum, each run a line, and a panel of every ``loss_kd_*`` term.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_metrics import DETECTOR_LOSSES, _series, _smooth, _spans_decades, read_metrics

    records = [(title, read_metrics(run.output_dir)) for title, run in runs]
    present = {k for _, r in records for values in r.values() for k in values}
    detector = [k for k in DETECTOR_LOSSES if k in present]
    distill = sorted(k for k in present if k.startswith("loss_kd_"))
    panels = [(k, [k]) for k in detector] + [("detector loss (sum)", detector)]
    if distill:
        panels.append(("distillation terms", distill))
    ncols = 3
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    styles = {"teacher": ":", "baseline": "--"}
    for ax, (name, keys) in zip(axes.flat, panels):
        if name == "distillation terms":
            for title, r in records:
                for k in keys:
                    xs, ys = _series(r, k)
                    if xs:
                        ax.plot(xs, _smooth(ys, smooth), marker="o", markersize=3, linewidth=1.2,
                                label=k[len("loss_kd_"):] + ("" if title.startswith("distilled") else f" ({title})"))
            if _spans_decades(dict(records)[runs[-1][0]], keys):
                ax.set_yscale("log")
        else:
            for title, r in records:
                xs, ys = _summed(r, keys)
                if xs:
                    ax.plot(xs, _smooth(ys, smooth), styles.get(title.split(" ")[0], "-"), marker="o", markersize=3,
                            linewidth=1.4, label=title)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training curves: " + ", ".join(title for title, _ in runs))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return output


def _summed(records, keys):
    """Iterations where every one of ``keys`` was logged, and the sum of their values."""
    xs, ys = [], []
    for it, values in records.items():
        if keys and all(k in values for k in keys):
            xs.append(it)
            ys.append(sum(values[k] for k in keys))
    return xs, ys


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-config", default=DEFAULT_TEACHER_CONFIG)
    parser.add_argument("--distill-config", default=DEFAULT_DISTILL_CONFIG,
                        help="the distilled student; the baseline is this config with DISTILL.HEADS []")
    parser.add_argument("--seed", type=int, default=None, help="SEED of both students (default: the distill config's)")
    parser.add_argument("--output-root", default=DEFAULT_OUTPUT_ROOT,
                        help="folder of the runs and the pictures (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"2 iterations, 96 px inputs, the first {QUICK_TEST_IMAGES} test images (checks the "
                        "plumbing, in seconds; the numbers mean nothing)")
    parser.add_argument("--images", type=int, default=None,
                        help=f"test images in detections.png (default 3; --quick: {QUICK_PICTURE_IMAGES})")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.chdir(REPO)
    start = time.time()
    if args.quick:
        import torch

        torch.set_num_threads(1)
    output_root = os.path.abspath(args.output_root)
    teacher, baseline, distilled = demo_runs(
        args.teacher_config, args.distill_config, args.seed, args.quick, output_root
    )
    status = {run.name: ensure_run(run) for run in (teacher, baseline, distilled)}

    rows = table_rows(teacher, baseline, distilled, args.distill_config)
    table = format_table(rows)
    split = f"the first {QUICK_TEST_IMAGES} images of {TEST_SET}" if args.quick else f"{TEST_SET} (72 images)"
    print(f"\nBCCD: COCO-style box AP on {split}; both students SEED {_seed_of(baseline)}:\n")
    print(table)
    print("\nOne seed: benchmarks/demo_seeds.py measures the distilled student's gain over seeds 0, 1 and 2.")
    with open(os.path.join(output_root, "demo_table.md"), "w") as f:
        f.write(table + "\n")

    runs = [("teacher", teacher), ("baseline", baseline), ("distilled", distilled)]
    images = args.images if args.images is not None else (QUICK_PICTURE_IMAGES if args.quick else 3)
    titled = [(f"{name}, AP {m['AP']:.1f}", run) for (name, run), (_, m, _) in zip(runs, rows)]
    detections = draw_detections(titled, os.path.join(output_root, "detections.png"), images)
    curves = plot_curves(runs, os.path.join(output_root, "curves.png"))
    print(f"\nDetections (ground truth | teacher | baseline | distilled): {detections}")
    print(f"Training curves (detector losses, distillation terms): {curves}")
    print(f"Runs: {', '.join(f'{r.name} {status[r.name]}' for r in (teacher, baseline, distilled))}; "
          f"total time {(time.time() - start) / 60:.1f} min. Distilled student: {distilled.weights}")
    summary = {
        "status": status,
        "runs": {r.name: r.output_dir for r in (teacher, baseline, distilled)},
        "metrics": {r.name: box_metrics(r.results()) for r in (teacher, baseline, distilled)},
        "delta_AP": rows[2][2],
        "seed": _seed_of(baseline),
        "table": table,
        "detections": detections,
        "curves": curves,
    }
    with open(os.path.join(output_root, "demo_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _seed_of(run):
    i = run.opts.index("SEED")
    return int(run.opts[i + 1])


if __name__ == "__main__":
    main()
