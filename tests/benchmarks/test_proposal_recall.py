"""benchmarks/proposal_recall.py and study.proposal_recall: coverage by hand, and the tool on two images."""

import os

import pytest
import torch

from conftest import CONFIGS


@pytest.fixture(scope="module")
def proposal_recall(load_script):
    return load_script("proposal_recall")


def test_covered_per_class_by_hand():
    """A ground-truth box is covered at k when one of the first k proposals has IoU >= 0.5 with it."""
    from study.proposal_recall import covered_per_class

    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 54.0, 54.0]])
    classes = torch.tensor([0, 0, 1])
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 12.0],    # IoU 100/120 = 0.83 with gt 0
        [40.0, 40.0, 45.0, 45.0],  # overlaps nothing
        [20.0, 20.0, 30.0, 40.0],  # IoU 100/200 = 0.5 with gt 1: covered (>=)
        [50.0, 50.0, 58.0, 58.0],  # IoU 16/64 = 0.25 with gt 2: not covered
    ])
    assert covered_per_class(proposals, gt, classes, [1, 2, 4]) == {
        1: {0: [1, 2], 1: [0, 1]}, 2: {0: [1, 2], 1: [0, 1]}, 4: {0: [2, 2], 1: [0, 1]}}
    assert covered_per_class(proposals, gt, classes, [4], iou_threshold=0.2)[4] == {0: [2, 2], 1: [1, 1]}
    assert covered_per_class(proposals, gt[:0], classes[:0], [4]) == {4: {}}


def test_proposal_recall_tool_gives_one_checkpoint_the_same_recall_twice(tmp_path, teacher_r18_weights,
                                                                        proposal_recall):
    """The same weights under two names give the same table (the ground truth is rescaled once,
    not once per checkpoint: detectron2's transform_instance_annotations edits its input), and
    weights that do not fit the config are refused, not measured as a random model."""
    out = tmp_path / "recall.md"
    results = proposal_recall.main([
        "--config-file", os.path.join(CONFIGS, "bccd", "student_R18_FPN.yaml"), "--dataset", "bccd_val",
        "--top-k", "10", "100", "--output", str(out), "--weights", f"a={teacher_r18_weights}", f"b={teacher_r18_weights}",
        "--max-images", "2", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"])
    assert results["a"] == results["b"]
    assert set(results["a"]) == {10, 100} and set(results["a"][100]) <= {"RBC", "WBC", "Platelets"}
    for k in (10, 100):
        assert all(0.0 <= v <= 100.0 for v in results["a"][k].values())
    assert all(results["a"][100][c] >= results["a"][10][c] for c in results["a"][10])  # more proposals cover more
    text = out.read_text()
    assert "Recall (%) of the top 100 proposals" in text and "python benchmarks/proposal_recall.py" in text
    with pytest.raises(RuntimeError, match="do not fit the student"):
        proposal_recall.main(["--config-file", os.path.join(CONFIGS, "bccd", "teacher_R50_FPN.yaml"),
                              "--weights", f"a={teacher_r18_weights}", "--max-images", "1"])
    with pytest.raises(SystemExit):
        proposal_recall.main(["--config-file", os.path.join(CONFIGS, "bccd", "student_R18_FPN.yaml"),
                              "--weights", f"a={tmp_path / 'missing.pth'}"])
