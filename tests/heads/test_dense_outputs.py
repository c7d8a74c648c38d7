"""d2kd.heads.dense_outputs: RetinaNet head outputs flattened in Detectron2's anchor order."""

import pytest
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


def _dense_records(n, k_count, h, w, a_count=1):
    logits = torch.randn(n, a_count * k_count, h, w)
    return Records({"head": [((), ([logits], [torch.zeros(n, a_count * 4, h, w)]))]}), logits


class _Head(DenseOutputsMixin):
    name = "densekd"
    num_classes = 3


def test_paired_dense_logits_returns_both_models_logits():
    student, s_raw = _dense_records(2, 3, 4, 5)
    teacher, t_raw = _dense_records(2, 3, 4, 5)
    s_logits, t_logits = _Head().paired_dense_logits(student, teacher)
    assert s_logits.shape == t_logits.shape == (2, 20, 3)
    assert torch.equal(s_logits[1, 4 * 5 - 1], s_raw[1, :, 3, 4])
    assert torch.equal(t_logits[0, 0], t_raw[0, :, 0, 0])


def test_paired_dense_logits_names_differently_padded_images():
    student, _ = _dense_records(2, 3, 4, 5)
    teacher, _ = _dense_records(2, 3, 4, 6)  # the teacher's image padded one stride wider
    with pytest.raises(RuntimeError) as error:
        _Head().paired_dense_logits(student, teacher)
    message = str(error.value)
    assert "Head 'densekd'" in message and "(2, 24, 3)" in message and "(2, 20, 3)" in message
    assert "SIZE_DIVISIBILITY" in message and "INPUT_SCALE 1.0" in message
