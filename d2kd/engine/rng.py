"""Random-number-generator state as a checkpointable, so a resumed run continues exactly."""

import random

import numpy as np
import torch
from detectron2.utils import comm

__all__ = ["RNGState"]


class RNGState:
    """
    ``state_dict``/``load_state_dict`` over Python's, NumPy's and torch's CPU generators.
    Restored in single-process runs only (see ``load_state_dict``).
    """

    def state_dict(self):
        # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state):
        # Only rank 0 writes checkpoints; giving its generator state to every rank would make
        # all ranks draw the same samples, so multi-process runs keep their own seeds.
        if comm.get_world_size() > 1:
            return
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
