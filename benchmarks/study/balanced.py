"""
Balanced against paper weights: each ``<preset>_balanced`` run (the preset with
``DISTILL.LOSS_BALANCE.MODE initial``) paired with the same preset's paper-weight run at the
same seed.

Both runs of a pair start from the same student initialisation, image order and flips, so
(balanced AP − paper-weight AP) at one seed isolates what the loss balance changed, as the main
table's paired ΔAP isolates what distillation changed. The accuracy report lists it when a
study holds both rows (docs/accuracy_study.md, "Automatic loss balance").
"""

from typing import Dict, List

from .common import fmt_mean_std, markdown_table, mean_std

__all__ = ["BALANCED_SUFFIX", "balanced_lines"]

BALANCED_SUFFIX = "_balanced"


def balanced_lines(runs: List[dict]) -> List[str]:
    """
    The report's "Balanced against paper weights" table: per preset with both rows, the seeds
    they share, each one's mean AP over those seeds, the mean ± std of (balanced − paper) per
    seed, and the balanced runs' multipliers. Nothing when no preset has both.
    """
    ap: Dict[str, Dict[int, float]] = {}
    multipliers: Dict[str, Dict[int, List[float]]] = {}
    for e in runs:
        if e.get("kind") == "distill" and (e.get("metrics") or {}).get("AP") is not None:
            ap.setdefault(e["method"], {})[e["seed"]] = e["metrics"]["AP"]
            heads = ((e.get("loss_balance") or {}).get("multipliers") or {})
            multipliers.setdefault(e["method"], {})[e["seed"]] = list(heads.values())
    rows = []
    for balanced in sorted(m for m in ap if m.endswith(BALANCED_SUFFIX)):
        preset = balanced[: -len(BALANCED_SUFFIX)]
        seeds = sorted(set(ap[balanced]) & set(ap.get(preset, {})))
        if not seeds:
            continue
        diffs = [ap[balanced][s] - ap[preset][s] for s in seeds]
        rows.append([
            preset,
            ", ".join(f"s{s}" for s in seeds),
            fmt_mean_std(mean_std([ap[preset][s] for s in seeds])[0]),
            fmt_mean_std(mean_std([ap[balanced][s] for s in seeds])[0]),
            fmt_mean_std(*mean_std(diffs), signed=True),
            ", ".join(f"{v:.3g}" for s in seeds for v in multipliers[balanced][s]) or "–",
        ])
    if not rows:
        return []
    return [
        "Balanced against paper weights: each `<preset>_balanced` run (`DISTILL.LOSS_BALANCE.MODE initial`) "
        "paired with the preset's paper-weight run at the same seed; AP means over the shared seeds, "
        "balanced − paper as mean ± std over them, and the multiplier of each balanced run.",
        "",
        markdown_table(["Preset", "seeds", "paper AP", "balanced AP", "balanced − paper", "multipliers"], rows,
                       align="llrrrl"),
    ]
