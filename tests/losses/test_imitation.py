"""d2kd.losses.imitation: the weighted imitation loss(es) against direct loops and hand values."""

import numpy as np
import pytest
import torch

from d2kd.losses.imitation import weighted_imitation_loss, weighted_imitation_losses

from conftest import np_imitation_loss


def test_weighted_imitation_loss_golden():
    rng = np.random.RandomState(0)
    s, t = rng.randn(2, 3, 2, 3), rng.randn(2, 3, 2, 3)
    w = rng.rand(2, 2, 3)
    S, T, W = torch.tensor(s), torch.tensor(t), torch.tensor(w)
    for distance in ("l2", "l1"):
        for channel in ("mean", "sum"):
            for normalizer in ("weight_sum", "num_cells"):
                for half in (True, False):
                    got = weighted_imitation_loss(S, T, W, distance, channel, normalizer, half).item()
                    want = np_imitation_loss(s, t, w, distance, channel == "mean", normalizer, half)
                    assert got == pytest.approx(want, rel=1e-10), (distance, channel, normalizer, half)
    # Hand value: one channel, 2x2, weights [[1, 0], [0, 3]]: (1*1^2 + 3*2^2) / (2 * 4) = 13/8.
    s1 = torch.tensor([[[[1.0, 5.0], [0.0, 2.0]]]])
    w1 = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    assert weighted_imitation_loss(s1, torch.zeros_like(s1), w1).item() == pytest.approx(13 / 8)
    # smooth_l1 (beta 1): 0.5 x^2 below 1, |x| - 0.5 above: (1*0.5 + 3*1.5) / (2*4) = 5/8.
    assert weighted_imitation_loss(s1, torch.zeros_like(s1), w1, "smooth_l1").item() == pytest.approx(5 / 8)
    # All-zero weights: a zero that keeps the graph.
    s2 = s1.clone().requires_grad_(True)
    zero = weighted_imitation_loss(s2, torch.zeros_like(s1), torch.zeros_like(w1))
    assert zero.item() == 0.0 and zero.requires_grad


def test_weighted_imitation_losses_share_one_distance_map():
    """Several weight maps (DeFeat/GKD fg and bg): each equals the direct loops, grads add up."""
    rng = np.random.RandomState(1)
    s, t = rng.randn(2, 4, 3, 2), rng.randn(2, 4, 3, 2)
    fg = (rng.rand(2, 3, 2) > 0.5).astype(np.float64)
    S = torch.tensor(s, requires_grad=True)
    got = weighted_imitation_losses(S, torch.tensor(t), [torch.tensor(fg), torch.tensor(1.0 - fg)])
    assert [g.item() for g in got] == [pytest.approx(np_imitation_loss(s, t, fg)), pytest.approx(np_imitation_loss(s, t, 1.0 - fg))]
    (3.0 * got[0] + 12.0 * got[1]).backward()
    # d/dS of 0.5 sum w (S-T)^2 / (C sum w) = w (S - T) / (C sum w), per mask
    want = sum(k * m[:, None] * (s - t) / (4 * m.sum()) for k, m in ((3.0, fg), (12.0, 1.0 - fg)))
    assert np.allclose(S.grad.numpy(), want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="weight map must be"):
        weighted_imitation_losses(S, torch.tensor(t), [torch.tensor(fg), torch.ones(2, 3, 3)])
