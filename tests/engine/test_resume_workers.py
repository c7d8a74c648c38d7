"""Resume is exact with the shipped DATALOADER.NUM_WORKERS (1) and random flips: N straight == k + resume + N - k."""

import pytest
import torch

from conftest import distill_cfg, train
from d2kd.data.sampler import PositionedIndex, ResumedTrainingSampler, sample_seed


@pytest.mark.train
@pytest.mark.parametrize("workers", [1, 2])
def test_resume_with_data_workers_equals_straight_run(tmp_path, teacher_r18_weights, workers):
    opts = ["INPUT.RANDOM_FLIP", "horizontal", "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 7,
            "DATALOADER.NUM_WORKERS", workers]
    straight_cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path / "straight", teacher_r18_weights,
                               opts=opts, max_iter=4)
    torch.manual_seed(0)
    straight = train(straight_cfg)
    split_cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path / "split", teacher_r18_weights,
                            opts=opts, max_iter=2)
    torch.manual_seed(0)
    train(split_cfg)
    split_cfg.defrost()
    split_cfg.SOLVER.MAX_ITER = 4
    resumed = train(split_cfg, resume=True)
    assert resumed.start_iter == 2
    for module in ("student", "heads"):
        a, b = getattr(straight, module).state_dict(), getattr(resumed, module).state_dict()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{module}: {len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def test_sampler_positions_continue_after_a_skip():
    straight = ResumedTrainingSampler(10, seed=3)
    resumed = ResumedTrainingSampler(10, seed=3, skip_per_rank=5)
    first = [next(iter(straight)) for _ in range(1)]
    head = []
    for i, index in enumerate(iter(straight)):
        head.append((int(index), index.position))
        if i == 7:
            break
    tail = []
    for i, index in enumerate(iter(resumed)):
        tail.append((int(index), index.position))
        if i == 2:
            break
    assert isinstance(first[0], PositionedIndex) and head[5:8] == tail
    assert [p for _, p in head] == list(range(8))
    assert sample_seed(3, 5) != sample_seed(3, 6) and sample_seed(3, 5) == sample_seed(3, 5)
