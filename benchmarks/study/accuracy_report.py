"""
The accuracy study's report (``benchmarks/accuracy.py``): per-method mean and sample
standard deviation over seeds, the gain over the baseline and the share of the teacher-student
gap closed, the gain paired by seed, the loss balance, as a Markdown table and a bar chart.

Input is the study's results dict: ``{"runs": [entry, ...], "invocations": [...], ...}``, one
entry per (method, seed) with ``metrics`` (AP, AP50, AP75), ``iterations``, ``date``, ``git``
and, for distillation runs, ``loss_balance`` (:func:`study.loss_balance`); student
runs may carry ``detector_fit`` (:func:`study.detector_fit`).
"""

import os
from collections import OrderedDict
from typing import Dict, List, Optional

from .balanced import balanced_lines
from .common import fmt_mean_std as _fmt, markdown_table, mean_std
from .detector_fit import detector_fit_lines
from .per_class import per_class_lines

__all__ = ["METRICS", "summarize", "other_teacher_runs", "other_cpu_runs", "render_markdown", "render_chart"]

METRICS = ("AP", "AP50", "AP75")
# Two evaluations of one teacher checkpoint on one split agree to far better than this.
TEACHER_AP_TOLERANCE = 0.05


def summarize(runs: List[dict], metrics=METRICS) -> "OrderedDict[str, dict]":
    """
    Per method: n seeds, mean and sample standard deviation (ddof 1) of each metric, the
    gain of the mean over the baseline's mean, and the fraction of the teacher-student gap
    closed, ``(mean_method - mean_baseline) / (mean_teacher - mean_baseline)``.
    Rows: teacher, baseline, then methods by decreasing mean AP.
    """
    by_method: Dict[str, List[dict]] = OrderedDict()
    for entry in runs:
        by_method.setdefault(entry["method"], []).append(entry)
    rows = OrderedDict()
    for method, entries in by_method.items():
        row = {
            "method": method,
            "n": len(entries),
            "seeds": sorted(e["seed"] for e in entries),
            "iterations": sorted({e.get("iterations") for e in entries}, key=str),
            "AP_per_seed": sorted((e["seed"], e["metrics"].get("AP")) for e in entries),
        }
        for m in metrics:
            row[m], row[m + "_std"] = mean_std([e["metrics"].get(m) for e in entries])
        rows[method] = row
    base, teacher = rows.get("baseline"), rows.get("teacher")
    for method, row in rows.items():
        for m in metrics:
            gain = gap = None
            if base and method not in ("baseline", "teacher") and row[m] is not None and base[m] is not None:
                gain = row[m] - base[m]
                if teacher and teacher[m] is not None and teacher[m] - base[m] > 0:
                    gap = gain / (teacher[m] - base[m])
            row[m + "_gain"], row[m + "_gap_closed"] = gain, gap
        # Paired by seed: a seed fixes the student's initialisation (built before the teacher),
        # the image order and the flips (the loader's own seeded generator), so method_s -
        # baseline_s removes the part of the seed noise the two runs share; its spread is the
        # noise of the gain itself. Only RoI/anchor sampling (torch's global generator) differs.
        # tests/test_trainer.py::test_one_seed_gives_baseline_and_distilled_student_the_same_start_and_data
        diffs = []
        if base and method not in ("baseline", "teacher"):
            base_by_seed = dict(base["AP_per_seed"])
            diffs = [ap - base_by_seed[seed] for seed, ap in row["AP_per_seed"]
                     if ap is not None and base_by_seed.get(seed) is not None]
        row["AP_paired_gain"], row["AP_paired_gain_std"] = mean_std(diffs)
        row["AP_paired_n"] = len(diffs)
    ordered = OrderedDict()
    for special in ("teacher", "baseline"):
        if special in rows:
            ordered[special] = rows.pop(special)
    for method in sorted(rows, key=lambda k: -(rows[k]["AP"] if rows[k]["AP"] is not None else -1e9)):
        ordered[method] = rows[method]
    return ordered


def other_teacher_runs(runs: List[dict], tolerance: float = TEACHER_AP_TOLERANCE) -> List[tuple]:
    """
    ``(method, seed, teacher AP)`` of the distillation runs whose teacher, as the run itself
    evaluated it (``teacher_metrics``, from ``DISTILL.EVAL_TEACHER``), differs from the teacher
    row's AP by more than ``tolerance``: they were distilled from other weights (a retrained
    teacher), so their gain is not measured against the teacher they learned from.
    """
    teacher = next((e for e in runs if e.get("method") == "teacher"), None)
    teacher_ap = (teacher or {}).get("metrics", {}).get("AP")
    if teacher_ap is None:
        return []
    found = []
    for e in runs:
        ap = (e.get("teacher_metrics") or {}).get("AP")
        if e.get("kind") == "distill" and ap is not None and abs(ap - teacher_ap) > tolerance:
            found.append((e["method"], e["seed"], ap))
    return sorted(found)


def _other_teacher_lines(runs: List[dict]) -> List[str]:
    found = other_teacher_runs(runs)
    if not found:
        return []
    listed = ", ".join(f"{method} s{seed} (teacher AP {ap:.1f})" for method, seed, ap in found)
    return [
        f"Distilled from other teacher weights than the teacher row's (the teacher AP each run "
        f"evaluated, `DISTILL.EVAL_TEACHER`): {listed}. Their gain and gap closed are still "
        "computed against the teacher row.",
        "",
    ]


def other_cpu_runs(runs: List[dict]) -> List[tuple]:
    """
    ``(method, seed, cpu, baseline cpu)`` of the runs trained on another CPU kind (the ``cpu``
    each run records) than the baseline run of their seed. The same from-scratch run did not
    repeat across CPU kinds here (the BCCD val teacher: 57.7 AP on an AMD EPYC, 58.6 on an Intel Xeon;
    docs/accuracy_study.md), so such a pair's difference holds machine noise as well as the
    method's effect. Runs or baselines without a recorded ``cpu`` are not listed.
    """
    baseline_cpu = {e["seed"]: e.get("cpu") for e in runs if e.get("kind") == "baseline"}
    found = []
    for e in runs:
        theirs = baseline_cpu.get(e.get("seed"))
        if e.get("kind") == "distill" and e.get("cpu") and theirs and e["cpu"] != theirs:
            found.append((e["method"], e["seed"], e["cpu"], theirs))
    return sorted(found)


def _other_cpu_lines(runs: List[dict]) -> List[str]:
    found = other_cpu_runs(runs)
    if not found:
        return []
    listed = ", ".join(f"{method} s{seed} ({cpu}; baseline {base})" for method, seed, cpu, base in found)
    return [
        f"Trained on another CPU kind than the baseline run of their seed: {listed}. A from-scratch "
        "run did not repeat across CPU kinds here, so their paired gain also holds machine noise.",
        "",
    ]


def _fmt_paired(row) -> str:
    """The paired gain cell: ``+mean ± std (pairs)``, or a dash without pairs."""
    if not row["AP_paired_n"]:
        return "–"
    return f"{_fmt(row['AP_paired_gain'], row['AP_paired_gain_std'], signed=True)} ({row['AP_paired_n']})"


def render_markdown(results: dict) -> str:
    summary = summarize(results.get("runs", []))
    rows = []
    for method, r in summary.items():
        rows.append(
            [
                f"**{method}**" if method in ("teacher", "baseline") else method,
                r["n"],
                _fmt(r["AP"], r["AP_std"]),
                _fmt(r["AP50"], r["AP50_std"]),
                _fmt(r["AP75"], r["AP75_std"]),
                _fmt(r["AP_gain"], signed=True),
                "–" if r["AP_gap_closed"] is None else f"{100 * r['AP_gap_closed']:.0f}%",
                "/".join(str(i) for i in r["iterations"]),
                _fmt_paired(r),
                ", ".join(f"s{seed} {_fmt(ap)}" for seed, ap in r["AP_per_seed"]),
            ]
        )
    runs = results.get("runs", [])
    dates = sorted(e["date"] for e in runs if e.get("date"))
    commits = sorted({(e.get("git") or {}).get("commit") or "?" for e in runs})
    dirty = any((e.get("git") or {}).get("dirty") for e in runs)
    lines = [
        f"# BCCD accuracy: {_model_name(results.get('teacher_config'))} teacher -> "
        f"{_model_name(results.get('student_config'))} student ({results.get('split')} split)",
        "",
        f"Trained on `{results.get('train_dataset')}`, evaluated on `{results.get('test_dataset')}` "
        "(COCO-style box AP, AP50, AP75, in %). Mean ± sample standard deviation over seeds (n); "
        "the last column lists each seed's AP (sN: SEED N). Paired ΔAP: mean ± std over the seeds "
        "the method shares with the baseline of (method AP − baseline AP) at the same seed, which "
        "starts from the same student initialisation, image order and flips (RoI sampling differs). "
        "Gain: mean AP minus the baseline's mean AP. Gap closed: gain / (teacher AP − baseline AP).",
        "",
        markdown_table(
            ["Method", "n", "AP", "AP50", "AP75", "ΔAP vs baseline", "gap closed", "iters", "paired ΔAP (pairs)",
             "AP per seed"],
            rows,
            align="lrrrrrrrrl",
        ),
        *_other_teacher_lines(runs),
        *_other_cpu_lines(runs),
        *_loss_balance_lines(runs),
        *balanced_lines(runs),
        *per_class_lines(runs, methods=[m for m in summary if m not in ("teacher", "baseline")]),
        *detector_fit_lines(runs),
        f"Runs: {len(runs)}; dates {dates[0] if dates else '?'} .. {dates[-1] if dates else '?'}; "
        f"commit(s) {', '.join(c[:12] for c in commits)}{' (working tree had local changes)' if dirty else ''}.",
        "",
        "Made by:",
        "",
    ]
    for inv in results.get("invocations", []):  # every one: the first made the teacher and baseline rows
        lines.append(f"    {inv['command']}    # {inv.get('date', '')}")
    lines += ["", "Per-run commands, configs and wall times: the JSON file beside this one.", ""]
    return "\n".join(lines)


def _loss_balance_lines(runs: List[dict]) -> List[str]:
    """A table of distillation loss / detector loss per method (mean over seeds), or nothing."""
    by_method: Dict[str, List[dict]] = OrderedDict()
    for e in runs:
        if e.get("kind") == "distill" and e.get("loss_balance"):
            by_method.setdefault(e["method"], []).append(e["loss_balance"])
    if not by_method:
        return []
    rows = []
    for method in sorted(by_method):
        cells = [method, len(by_method[method])]
        for when in ("start", "end"):
            for key in ("detector", "distill", "ratio"):
                values = [b[when][key] for b in by_method[method] if b[when][key] is not None]
                cells.append(f"{sum(values) / len(values):.3g}" if values else "–")
        rows.append(cells)
    balanced = any(b.get("multipliers") for runs_ in by_method.values() for b in runs_)
    if balanced:  # DISTILL.LOSS_BALANCE's fixed multiplier of each head, mean over seeds
        for method, row in zip(sorted(by_method), rows):
            row.append(_mean_multipliers(by_method[method]))
    return [
        "Loss balance (from each run's metrics.json, mean over seeds): detector loss, distillation loss "
        "(sum of the `loss_kd_*` terms but regularisers of a head's own weights, such as HGD's "
        "`loss_kd_hgd_logvar`) and their ratio over the first and the last 10% of the logged "
        "iterations with distillation on"
        + (
            "; multiplier: the head's fixed `DISTILL.LOSS_BALANCE` multiplier (– for paper weights)."
            if balanced
            else "."
        ),
        "",
        markdown_table(
            ["Method", "n", "det. start", "KD start", "KD/det start", "det. end", "KD end", "KD/det end"]
            + (["multiplier"] if balanced else []),
            rows,
            align="lrrrrrrr" + ("l" if balanced else ""),
        ),
    ]


def _mean_multipliers(balances: List[dict]) -> str:
    per_head: Dict[str, List[float]] = OrderedDict()
    for b in balances:
        for head, value in (b.get("multipliers") or {}).items():
            per_head.setdefault(head, []).append(value)
    return ", ".join(f"{head} {sum(v) / len(v):.3g}" for head, v in per_head.items()) or "–"


def _model_name(config: Optional[str]) -> str:
    return os.path.splitext(os.path.basename(config))[0] if config else "?"


def render_chart(results: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results.get("runs", []))
    if not summary:
        return None
    names = list(summary)
    width = 0.26
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    for k, m in enumerate(METRICS):
        xs = [i + (k - 1) * width for i in range(len(names))]
        means = [summary[n][m] if summary[n][m] is not None else 0.0 for n in names]
        stds = [summary[n][m + "_std"] or 0.0 for n in names]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=m)
    base = summary.get("baseline", {}).get("AP")
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="baseline AP")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n(n={summary[n]['n']})" for n in names], fontsize=8)
    ax.set_ylabel("box AP (%)")
    ax.set_title(
        f"{_model_name(results.get('teacher_config'))} → {_model_name(results.get('student_config'))}, "
        f"{results.get('test_dataset')}: mean ± std over seeds",
        fontsize=10,
    )
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
