"""DISTILL.LOSS_BALANCE in a run: multipliers logged, applied, checkpointed, restored on resume, and shown by --check."""

import json
import os

import pytest
import torch

from conftest import distill_cfg, train
from d2kd.engine.check import run_check

BALANCE = ["DISTILL.LOSS_BALANCE.MODE", "initial", "DISTILL.LOSS_BALANCE.ITERS", 2, "DISTILL.LOSS_BALANCE.TARGET", 0.5]


def _cfg(tmp_path, teacher_r18_weights, max_iter=4, opts=()):
    return distill_cfg("bccd/distill_fitnet_R50_R18.yaml", tmp_path, teacher_r18_weights,
                       opts=BALANCE + ["SOLVER.CHECKPOINT_PERIOD", 2] + list(opts), max_iter=max_iter)


@pytest.mark.train
def test_multipliers_are_fixed_logged_applied_and_checkpointed(tmp_path, teacher_r18_weights):
    trainer = train(_cfg(tmp_path / "straight", teacher_r18_weights))
    balance = trainer.loss_balance
    assert bool(balance.frozen) and int(balance.measured) == 2
    m = balance.multiplier("fitnet")
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.json")]
    assert rows[-1]["distill_balance/fitnet"] == pytest.approx(m)
    assert not [k for k in rows[-1] if "loss" in k and "/" in k]  # Detectron2's printer lists "loss" keys as losses
    assert m != 1.0
    saved = torch.load(tmp_path / "straight" / "model_final.pth", map_location="cpu", weights_only=False)
    assert saved["loss_balance"]["multipliers"].tolist() == pytest.approx([m])
    assert bool(saved["loss_balance"]["frozen"])

    # Resumed from the checkpoint after iteration 2 (the measurement done there): the same multiplier.
    resumed_dir = tmp_path / "resumed"
    first = train(_cfg(resumed_dir, teacher_r18_weights, max_iter=2))
    assert bool(first.loss_balance.frozen)
    resumed = train(_cfg(resumed_dir, teacher_r18_weights, max_iter=4), resume=True)
    assert resumed.start_iter == 2
    assert resumed.loss_balance.multiplier("fitnet") == pytest.approx(first.loss_balance.multiplier("fitnet"))


@pytest.mark.train
@pytest.mark.parametrize("measure_multiplier", [0.0, 1.0])
def test_while_measuring_the_terms_are_multiplied_by_measure_multiplier(tmp_path, teacher_r18_weights, measure_multiplier):
    """One iteration of a 2-iteration measurement: fitnet's logged term is 0 (measured, not trained on) or its paper value."""
    trainer = train(_cfg(tmp_path, teacher_r18_weights, max_iter=1,
                         opts=["DISTILL.LOSS_BALANCE.MEASURE_MULTIPLIER", measure_multiplier]))
    assert not bool(trainer.loss_balance.frozen) and int(trainer.loss_balance.measured) == 1
    measured = float(trainer.loss_balance.head_sums[0])  # the term before any multiplier
    assert measured > 0
    row = [json.loads(line) for line in open(tmp_path / "metrics.json")][-1]
    logged = sum(v for k, v in row.items() if k.startswith("loss_kd_fitnet"))
    assert row["distill_balance/fitnet"] == measure_multiplier
    assert logged == pytest.approx(measure_multiplier * measured, rel=1e-5)


@pytest.mark.train
def test_check_shows_the_multipliers(tmp_path, teacher_r18_weights):
    cfg = _cfg(tmp_path, teacher_r18_weights)
    report = run_check(cfg, num_images=0)
    assert report.ok, report.errors
    detector = sum(v for k, v in report.losses.items() if not k.startswith("loss_kd_"))
    fitnet = sum(v for k, v in report.losses.items() if k.startswith("loss_kd_fitnet"))
    assert report.loss_balance == pytest.approx({"fitnet": 0.5 * detector / fitnet})


@pytest.mark.train
def test_a_head_in_its_own_warm_up_is_not_measured(tmp_path, teacher_r18_weights):
    """FGFI's terms are 0 for its first WARMUP_ITERS iterations: the measurement starts after them (at 2,
    fixed at 3), from FGFI's real terms, not from zeros (which would leave the paper weight, 1)."""
    cfg = distill_cfg("bccd/distill_fgfi_R50_R18.yaml", tmp_path, teacher_r18_weights, max_iter=4,
                      opts=BALANCE + ["DISTILL.FGFI.WARMUP_ITERS", 2])
    trainer = train(cfg)
    balance = trainer.loss_balance
    assert bool(balance.frozen) and int(balance.measured) == 2
    fgfi_mean, detector_mean = float(balance.head_sums[0]) / 2, float(balance.detector_sum) / 2
    assert fgfi_mean > 0
    assert balance.multiplier("fgfi") == pytest.approx(0.5 * detector_mean / fgfi_mean)
    applied = dict((it, v) for v, it in trainer.storage.history("distill_balance/fgfi").values())
    assert applied[0] == applied[1] == applied[2] == 0.0  # measuring (MEASURE_MULTIPLIER 0) until fixed at 3
    assert applied[3] == pytest.approx(balance.multiplier("fgfi"))

    # --check steps where FGFI distils, so its terms and the multiplier they imply are real.
    report = run_check(cfg, num_images=0)
    assert report.ok, report.errors
    assert sum(v for k, v in report.losses.items() if k.startswith("loss_kd_fgfi")) > 0
    assert report.loss_balance["fgfi"] != 1.0
