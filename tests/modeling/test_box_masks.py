"""d2kd.modeling.box_masks: box windows on feature maps, and per-level box masks assigned by scale."""

import pytest
import torch

from d2kd.modeling.box_masks import box_windows, level_box_masks


def test_box_window_conventions():
    b = torch.tensor([[4.0, 4.0, 12.0, 10.0]])
    # stride 4: x/4 in [1, 3], y/4 in [1, 2.5]
    assert box_windows(b, 4, (5, 5), "inclusive").tolist() == [[1, 1, 4, 3]]
    assert box_windows(b, 4, (5, 5), "exclusive").tolist() == [[1, 1, 3, 2]]
    assert box_windows(b, 4, (5, 5), "outward").tolist() == [[1, 1, 4, 4]]
    # DeFeat's degenerate rule: empty in either direction -> only the top-left cell.
    assert box_windows(torch.tensor([[5.0, 5.0, 7.0, 7.0]]), 4, (5, 5), "exclusive").tolist() == [[1, 1, 2, 2]]
    assert box_windows(torch.tensor([[5.0, 4.0, 7.0, 16.0]]), 4, (5, 5), "exclusive").tolist() == [[1, 1, 2, 2]]
    # Clipped to the map.
    assert box_windows(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), 4, (5, 5), "outward").tolist() == [[0, 0, 5, 5]]
    with pytest.raises(ValueError, match="convention"):
        box_windows(b, 4, (5, 5), "round")


def test_level_box_masks_assign_boxes_by_scale():
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    levels = {n: int(n[1]) for n in strides}
    sizes = {n: (1024 // s, 1024 // s) for n, s in strides.items()}
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 40.0],  # sqrt(area) 40 < 112 -> P2
            [0.0, 0.0, 150.0, 150.0],  # 150 in [112, 224) -> P3
            [0.0, 0.0, 1000.0, 1000.0],  # 1000 >= 896 -> P6 (five levels)
        ]
    )
    masks = level_box_masks([boxes, torch.zeros(0, 4)], levels, strides, sizes)
    # "exclusive" windows: [0, floor(x2/s)) -> 10, 18 (150/8 = 18.75) and 15 (1000/64) cells a side.
    assert {n: masks[n][0].sum().item() for n in strides} == {"p2": 100, "p3": 324, "p4": 0, "p5": 0, "p6": 225}
    assert all(masks[n][1].sum().item() == 0 for n in strides), "an image without boxes has empty masks"
    assert masks["p2"][0, :10, :10].min().item() == 1 and masks["p2"].shape == (2, 256, 256)
    unassigned = level_box_masks([boxes], levels, strides, sizes, assign_by_scale=False)
    assert unassigned["p2"].sum().item() == 250 * 250


def test_box_to_level_rule_by_detector_kind():
    """Hand-computed: floor(4 + log2(side / canonical)) clamped; canonical 224 two-stage, 112 one-stage."""
    from d2kd.modeling.box_masks import assign_boxes_to_levels, canonical_box_size_for

    sides = torch.tensor([100.0, 150.0, 300.0, 900.0])
    boxes = torch.stack([torch.zeros(4), torch.zeros(4), sides, sides], 1)
    # Two-stage, P2..P6: 100 -> floor(2.84) = 2, 150 -> floor(3.42) = 3, 300 -> floor(4.42) = 4, 900 -> floor(6.01) = 6.
    two = assign_boxes_to_levels(boxes, 2, 6, canonical_box_size_for(one_stage=False))
    assert two.tolist() == [2, 3, 4, 6]
    # One-stage, P3..P7 (the official one-stage codes: <112 P3, 112-224 P4, 224-448 P5, ...):
    # 100 -> floor(3.84) = 3, 150 -> floor(4.42) = 4, 300 -> floor(5.42) = 5, 900 -> floor(7.01) = 7.
    one = assign_boxes_to_levels(boxes, 3, 7, canonical_box_size_for(one_stage=True))
    assert one.tolist() == [3, 4, 5, 7]
    # The two-stage rule on P3..P7 puts the same boxes one level finer (what GKD did on RetinaNet).
    assert assign_boxes_to_levels(boxes, 3, 7, canonical_box_size_for(one_stage=False)).tolist() == [3, 3, 4, 6]
    assert canonical_box_size_for(one_stage=True, configured=160) == 160.0
