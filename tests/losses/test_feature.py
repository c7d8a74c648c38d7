"""d2kd.losses.feature: the feature MSE by hand, and its shape check."""

import pytest
import torch

from d2kd.losses import feature_mse


def test_feature_mse_hand_value():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]])
    assert feature_mse(s, t).item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_mse(s, t[..., :1])
