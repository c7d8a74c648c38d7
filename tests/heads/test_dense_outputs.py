"""d2kd.heads.dense_outputs: RetinaNet head outputs flattened in Detectron2's anchor order."""

import torch

from d2kd.capture import Records
from d2kd.heads.dense_outputs import DenseOutputsMixin


def test_dense_predictions_layout():
    """(N, A*K, H, W) -> (N, H*W*A, K): anchor index (y*W + x)*A + a, channel a*K + k (Detectron2's order)."""
    n, a_count, k_count, h, w = 2, 3, 4, 2, 5
    logits = torch.arange(n * a_count * k_count * h * w, dtype=torch.float32).view(n, a_count * k_count, h, w)
    deltas = torch.zeros(n, a_count * 4, h, w)
    flat, flat_deltas = DenseOutputsMixin.dense_predictions(Records({"head": [((), ([logits], [deltas]))]}), k_count)
    assert flat.shape == (n, h * w * a_count, k_count) and flat_deltas.shape == (n, h * w * a_count, 4)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                for a in range(a_count):
                    for k in range(k_count):
                        assert flat[i, (y * w + x) * a_count + a, k] == logits[i, a * k_count + k, y, x]
