"""d2kd.losses.sigmoid_kd: the per-class binary KD divergence, its T^2 scaling and gradient, by hand."""

import math

import pytest
import torch

from d2kd.losses import binary_kd_div


def test_binary_kd_div_hand_computed():
    # z_s = 0 (p = 1/2), z_t = ln 3 (q = 3/4), T = 1.
    zs, zt = torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    bce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))  # = ln 2
    assert binary_kd_div(zs, zt, 1.0, "kl").item() == pytest.approx(kl, abs=1e-6)  # 0.130812
    assert binary_kd_div(zs, zt, 1.0, "bce").item() == pytest.approx(bce, abs=1e-6)
    # A single class: a softmax over classes would give 0; the per-class binary form does not.
    assert binary_kd_div(zs, zt).item() > 0.13
    # Equal logits cost nothing in the KL form; T^2 scaling: T = 2, z_s = 0, z_t = 2 ln 3 -> 4 * kl.
    assert binary_kd_div(zt, zt).abs().item() < 1e-7
    assert binary_kd_div(zs, 2 * zt, 2.0).item() == pytest.approx(4 * kl, abs=1e-5)
    # Gradient in the student: T^2 * d/dz BCE(sigmoid(z/T), q) = T * (p - q).
    z = torch.tensor([[0.0]], requires_grad=True)
    binary_kd_div(z, 2 * zt, 2.0).sum().backward()
    assert z.grad.item() == pytest.approx(2.0 * (0.5 - 0.75), abs=1e-6)
