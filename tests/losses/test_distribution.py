"""d2kd.losses.distribution: Hinton's KL divergence on class logits against a hand formula."""

import numpy as np
import pytest
import torch

from d2kd.losses import kd_kl_div


def test_kd_kl_div_matches_hand_formula():
    zs = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    zt = np.array([[2.0, 0.0, 1.0, -2.0], [1.0, -1.0, 2.0, 0.5]])
    T = 2.0

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(zs / T), softmax(zt / T)
    expected = T * T * np.mean(np.sum(q * (np.log(q) - np.log(p)), axis=1))
    got = kd_kl_div(torch.tensor(zs), torch.tensor(zt), T)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # Hand value for one row, T=1, uniform student: KL(q||u) = sum q log q + log K.
    q1 = softmax(np.array([[2.0, 0.0]]))[0]
    expected_row = float(np.sum(q1 * np.log(q1)) + np.log(2))
    assert kd_kl_div(torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), 1.0).item() == pytest.approx(expected_row)


def test_kd_kl_div_zero_when_equal_and_grad_only_to_student():
    zs = torch.randn(5, 4, requires_grad=True)
    zt = zs.detach().clone().requires_grad_(True)
    loss = kd_kl_div(zs, zt, 3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    kd_kl_div(zs, zt + torch.randn(5, 4), 3.0).backward()
    assert zs.grad is not None and zt.grad is None


def test_kd_kl_div_empty_rois_is_zero_with_graph():
    zs = torch.zeros(0, 4, requires_grad=True)
    loss = kd_kl_div(zs, torch.zeros(0, 4))
    assert loss.item() == 0.0 and loss.requires_grad
