"""DISTILL.LOSS_BALANCE: the multipliers by hand, the cap, off mode, the checkpointed state, and two ranks agreeing."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from d2kd.modeling.loss_balance import LossBalance


def _t(x):
    return torch.tensor(float(x))


def feed(balance, head_a, head_b, detector):
    fixed = []
    for a, b, d in zip(head_a, head_b, detector):
        terms = {"a": {"p2": _t(a / 2), "p3": _t(a / 2)}, "b": {"": _t(b), "logvar": _t(-5.0)}}
        fixed.append(balance.observe(terms, {"loss_cls": _t(d / 4), "loss_box_reg": _t(3 * d / 4)}))
    return fixed


def test_multipliers_by_hand():
    balance = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3)
    # head a: totals 2, 4, 6 (mean 4); head b: 0.1 each (its "logvar" regulariser is not measured);
    # detector: 1, 2, 3 (mean 2). m_a = 0.5 * 2 / 4 = 0.25, m_b = 0.5 * 2 / 0.1 = 10.
    assert feed(balance, [2, 4], [0.1, 0.1], [1, 2]) == [False, False]
    assert balance.as_dict() == {"a": 1.0, "b": 1.0}  # not fixed yet
    assert balance.applied() == {"a": 0.0, "b": 0.0}  # measured, not trained on (MEASURE_MULTIPLIER 0)
    assert feed(balance, [6], [0.1], [3]) == [True]
    assert balance.multiplier("a") == pytest.approx(0.25)
    assert balance.multiplier("b") == pytest.approx(10.0)
    assert balance.applied() == pytest.approx({"a": 0.25, "b": 10.0})
    assert feed(balance, [100], [100], [1]) == [False]  # frozen: later iterations change nothing
    assert balance.multiplier("a") == pytest.approx(0.25)


def test_measure_multiplier_applies_while_measuring_only():
    # MEASURE_MULTIPLIER 1: the paper weights while measuring; the fixed multipliers are the same maths.
    balance = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3, measure_multiplier=1.0)
    feed(balance, [2, 4], [0.1, 0.1], [1, 2])
    assert balance.applied() == {"a": 1.0, "b": 1.0}
    feed(balance, [6], [0.1], [3])
    assert balance.applied() == pytest.approx({"a": 0.25, "b": 10.0})


def test_cap_and_off_mode():
    capped = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3, max_multiplier=4.0)
    feed(capped, [2, 4, 6], [0.1, 0.1, 0.1], [1, 2, 3])
    assert capped.as_dict() == pytest.approx({"a": 0.25, "b": 4.0})
    off = LossBalance(["a", "b"], mode="off")
    assert feed(off, [2, 4, 6], [0.1, 0.1, 0.1], [1, 2, 3]) == [False] * 3
    assert off.as_dict() == off.applied() == {"a": 1.0, "b": 1.0}


def test_a_head_measured_at_zero_keeps_its_paper_weight_and_is_named(d2kd_logs):
    balance = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=2)
    logs = d2kd_logs("d2kd.modeling.loss_balance", logging.WARNING)
    feed(balance, [0, 0], [0.1, 0.1], [1, 3])
    assert balance.as_dict() == pytest.approx({"a": 1.0, "b": 0.5 * 2 / 0.1})
    assert "['a']" in logs.text and "DISTILL.LOSS_BALANCE.ITERS" in logs.text


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="LOSS_BALANCE.MODE"):
        LossBalance(["a"], mode="dynamic")
    with pytest.raises(ValueError, match="TARGET > 0"):
        LossBalance(["a"], mode="initial", target=0.0)
    with pytest.raises(ValueError, match="MEASURE_MULTIPLIER"):
        LossBalance(["a"], mode="initial", measure_multiplier=-1.0)


def test_state_is_in_the_state_dict_and_restores():
    """Half-way through the measurement: a resumed balancer finishes with the same multipliers."""
    straight = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3)
    feed(straight, [2, 4, 6], [0.1, 0.1, 0.1], [1, 2, 3])
    first = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3)
    feed(first, [2], [0.1], [1])
    resumed = LossBalance(["a", "b"], mode="initial", target=0.5, measure_iters=3)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, [4, 6], [0.1, 0.1], [2, 3])
    assert resumed.as_dict() == pytest.approx(straight.as_dict())
    assert set(straight.state_dict()) == {"multipliers", "head_sums", "detector_sum", "measured", "frozen"}


_TWO_RANKS = r"""
import json, os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from d2kd.modeling.loss_balance import LossBalance

def worker(rank, store, out):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    balance = LossBalance(["a"], mode="initial", target=1.0, measure_iters=2)
    # rank 0 sees head totals 1, 1 and rank 1 sees 3, 3; both see detector losses 2, 2.
    for _ in range(2):
        balance.observe({"a": {"": torch.tensor(1.0 + 2 * rank)}}, {"loss": torch.tensor(2.0)})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(balance.as_dict(), f)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


@pytest.mark.train
def test_two_ranks_apply_the_same_multipliers(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "multipliers"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(f"{out}.{rank}")) for rank in (0, 1)]
    # Averaged over ranks: head mean 2, detector mean 2 -> m = 1.0 * 2 / 2 = 1 on both ranks
    # (alone, rank 0 would take 2 and rank 1 2/3).
    assert ranks[0] == ranks[1] == pytest.approx({"a": 1.0})
