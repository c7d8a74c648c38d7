"""benchmarks/trace_steps.py on tiny inputs: per-group statistics by hand, and a traced run that diverges."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import distill_cfg


@pytest.fixture(scope="module")
def trace_steps(load_script):
    return load_script("trace_steps")


def test_group_statistics_by_hand(trace_steps):
    model = torch.nn.Module()
    model.body = torch.nn.Module()
    model.body.a = torch.nn.Linear(2, 3)
    model.body.b = torch.nn.Linear(3, 1)
    model.head = torch.nn.Linear(1, 1)
    g = torch.Generator().manual_seed(0)
    for p in model.body.parameters():
        p.data = torch.randn(p.shape, generator=g)
        p.grad = torch.randn(p.shape, generator=g)
    model.head.weight.data.fill_(-7.0)  # no gradient in this group
    stats = trace_steps.group_statistics(model.named_parameters(), depth=1)
    body = [p for p in model.body.parameters()]
    expected_norm = np.sqrt(sum((p.grad.numpy().astype(np.float64) ** 2).sum() for p in body))
    assert stats["body"]["grad_norm"] == pytest.approx(expected_norm, rel=1e-12)
    assert stats["body"]["max_abs"] == pytest.approx(max(np.abs(p.data.numpy()).max() for p in body))
    assert stats["head"] == {"grad_norm": None, "max_abs": 7.0}
    assert set(trace_steps.group_statistics(model.named_parameters(), depth=2)) == {"body.a", "body.b", "head.weight", "head.bias"}


@pytest.mark.train
def test_trace_steps_records_each_step_and_stops_at_divergence(tmp_path, teacher_r18_weights, monkeypatch,
                                                             trace_steps):
    cfg = distill_cfg("bccd/distill_fitnet_R50_R18.yaml", str(tmp_path / "run"), teacher_r18_weights, max_iter=10)
    cfg.freeze()
    out = tmp_path / "trace.jsonl"
    records = trace_steps.trace(cfg, 2, str(out))
    assert [r["iteration"] for r in records] == [0, 1]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    for r in records:
        assert np.isfinite(r["total_loss"]) and r["loss_kd_fitnet_p2"] > 0 and r["lr"] > 0
        assert r["groups"]["student.backbone.bottom_up"]["grad_norm"] > 0
        assert any(g.startswith("heads.fitnet") and s["grad_norm"] for g, s in r["groups"].items())
    assert not os.path.exists(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))  # no final step or evaluation

    from d2kd import DistillTrainer

    calls = []
    original = DistillTrainer.run_step

    def diverge_on_second_step(self):
        calls.append(self.iter)
        if len(calls) == 2:
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
        original(self)

    monkeypatch.setattr(DistillTrainer, "run_step", diverge_on_second_step)
    records = trace_steps.trace(cfg, 5, str(out))
    assert [r["iteration"] for r in records] == [0, 1] and "Inf/NaN" in records[-1]["diverged"]
    assert "groups" in records[0] and len(out.read_text().splitlines()) == 2
