"""d2kd.data.sampler: a resumed sampler skips the indices already consumed."""

from detectron2.data.samplers import TrainingSampler

from d2kd.data.sampler import ResumedTrainingSampler


def test_resumed_sampler_skips_consumed_indices():
    base = iter(TrainingSampler(10, seed=3))
    stream = [next(base) for _ in range(30)]
    resumed = iter(ResumedTrainingSampler(10, seed=3, skip_per_rank=7))
    assert [next(resumed) for _ in range(23)] == stream[7:]
