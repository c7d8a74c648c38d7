"""A training sampler that continues where a resumed run stopped."""

import itertools

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumedTrainingSampler"]


class ResumedTrainingSampler(TrainingSampler):
    """
    Detectron2's ``TrainingSampler`` (same seed, same infinite shuffled stream) with the
    first ``skip_per_rank`` indices of this rank dropped, so that a run resumed at iteration
    ``i`` sees the batches a straight run would see from ``i`` on
    (``skip_per_rank = i * IMS_PER_BATCH / world_size``).
    """

    def __init__(self, size: int, shuffle: bool = True, seed=None, skip_per_rank: int = 0):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._skip = int(skip_per_rank)

    def __iter__(self):
        start = self._rank + self._skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)
