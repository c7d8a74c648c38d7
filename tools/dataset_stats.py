#!/usr/bin/env python
"""
Box sizes per class of registered datasets (d2kd.data.box_stats): count, median box side in the
original images and at a training short side, and the COCO small / medium / large counts.

    python tools/dataset_stats.py --datasets bccd_trainval bccd_test --short-side 320
"""

import argparse
import os
import sys
from typing import Iterable, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> List[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["bccd_trainval", "bccd_test"], help="registered dataset names")
    parser.add_argument("--short-side", type=int, default=320, help="training short side (INPUT.MIN_SIZE_TRAIN)")
    args = parser.parse_args(argv)

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2kd import register_bccd
    from d2kd.data import datasets_root
    from d2kd.data.box_stats import box_size_stats

    register_bccd(datasets_root(default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "datasets")))
    lines = []
    for name in args.datasets:
        if name not in DatasetCatalog.list():
            parser.error(f"dataset '{name}' is not registered; registered: {', '.join(sorted(DatasetCatalog.list()))}")
        dicts = DatasetCatalog.get(name)
        stats = box_size_stats(dicts, MetadataCatalog.get(name).thing_classes, args.short_side)
        rows = [[cls, s["count"], _side(s["median_side"]), _side(s["median_side_scaled"]), s["small"], s["medium"],
                 s["large"]] for cls, s in stats.items()]
        lines += [f"{name}: {len(dicts)} images", "",
                  markdown_table(["class", "boxes", "median side (px)", f"at short side {args.short_side}",
                                  "small (< 32²)", "medium", "large (≥ 96²)"], rows)]
    print("\n".join(lines))
    return lines


def _side(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub Markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
