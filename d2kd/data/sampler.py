"""
A training sampler that continues where a resumed run stopped, and the per-sample seeds that
make a resumed run's augmentation equal a straight run's.

Detectron2's augmentations (flips, resize choices) draw from NumPy's global generator in the
process that maps the sample: the main process, or a data-loader worker whose generator starts
anew on every (re)start. After a resume the stream of images is right (the sampler skips what
was consumed) but each worker's generator is not where it was, so the flips differ. Here every
sample of the stream carries its global position, and its augmentation is drawn from a
generator seeded by ``(seed, position)``: the same for any ``NUM_WORKERS``, process count and
resume point.
"""

import contextlib
import itertools
import random

import numpy as np
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import TrainingSampler
from torch.utils.data import Dataset

__all__ = ["ResumedTrainingSampler", "PositionedIndex", "SeededMapDataset", "sample_seed", "seeded_generators"]


class PositionedIndex(int):
    """A dataset index that also knows its position in the sampler's global stream."""

    position: int

    def __new__(cls, index: int, position: int):
        obj = super().__new__(cls, index)
        obj.position = position
        return obj


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of a stream seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(position)) % (2**32)


@contextlib.contextmanager
def seeded_generators(seed: int):
    """NumPy's and Python's global generators seeded with ``seed`` inside, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededMapDataset(Dataset):
    """
    Detectron2's ``MapDataset(DatasetFromList(dicts), mapper)``; an item indexed by a
    :class:`PositionedIndex` is mapped (augmented) under :func:`seeded_generators` of its
    :func:`sample_seed`.
    """

    def __init__(self, dicts, mapper, seed: int):
        self._mapped = MapDataset(DatasetFromList(dicts, copy=False), mapper)
        self._seed = int(seed)

    def __len__(self):
        return len(self._mapped)

    def __getitem__(self, index):
        position = getattr(index, "position", None)
        if position is None:
            return self._mapped[index]
        with seeded_generators(sample_seed(self._seed, position)):
            return self._mapped[int(index)]


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

    @property
    def seed(self) -> int:
        """The stream's seed (``SEED``, or one shared by all ranks when ``SEED`` < 0)."""
        return self._seed

    def __iter__(self):
        start = self._rank + self._skip * self._world_size
        stream = itertools.islice(enumerate(self._infinite_indices()), start, None, self._world_size)
        for position, index in stream:
            yield PositionedIndex(index, position)
