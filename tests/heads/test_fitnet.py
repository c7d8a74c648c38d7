"""FitNets hints (docs/methods/fitnet.md): per-level golden values and the adapter switch."""

import numpy as np
import pytest
import torch

from d2kd.capture import Records
from d2kd.heads.fitnet import FitNet
from d2kd import get_distill_cfg
from conftest import fake_fpn_context


def test_fitnet_head_per_level_terms_golden():
    cfg = get_distill_cfg()
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2", "p3"]
    cfg.DISTILL.FITNET.WEIGHT = 0.5
    head = FitNet(cfg, fake_fpn_context(2, 3))
    # Make the 1x1 adapter a known linear map: out = W x + b.
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = torch.tensor([0.0, 1.0, -1.0])
    for adapter in head.pairing.adapters.values():
        adapter.conv.weight.data = W[:, :, None, None].clone()
        adapter.conv.bias.data = b.clone()
    gen = torch.Generator().manual_seed(0)
    s = {k: torch.randn(1, 2, n, n, generator=gen) for k, n in (("p2", 4), ("p3", 2))}
    t = {k: torch.randn(1, 3, n, n, generator=gen) for k, n in (("p2", 4), ("p3", 2))}
    out = head(Records({"backbone": [((), s)]}), Records({"backbone": [((), t)]}), None)
    assert set(out) == {"p2", "p3"}
    for k in ("p2", "p3"):
        sn, tn = s[k][0].numpy(), t[k][0].numpy()
        adapted = np.einsum("oc,chw->ohw", W.numpy(), sn) + b.numpy()[:, None, None]
        expected = 0.5 * np.mean((adapted - tn) ** 2)
        assert out[k].item() == pytest.approx(float(expected), rel=1e-5)


def test_fitnet_without_adapter_needs_equal_channels():
    cfg = get_distill_cfg()
    cfg.DISTILL.FITNET.IN_FEATURES = ["p2"]
    cfg.DISTILL.FITNET.ADAPTER.ENABLED = False
    with pytest.raises(ValueError, match="adapter is disabled.*2 channels.*3"):
        FitNet(cfg, fake_fpn_context(2, 3))
    head = FitNet(cfg, fake_fpn_context(3, 3))
    s = torch.ones(1, 3, 2, 2)
    t = torch.zeros(1, 3, 2, 2)
    out = head(Records({"backbone": [((), {"p2": s})]}), Records({"backbone": [((), {"p2": t})]}), None)
    assert out["p2"].item() == pytest.approx(1.0)
