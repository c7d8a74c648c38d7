"""d2kd.engine.hooks: non-finite loss terms are named; training stops and keeps the last good checkpoint."""

import glob
import os

import pytest
import torch

from d2kd import DistillTrainer
from d2kd.engine.hooks import NonFiniteLossError, check_finite_losses

from conftest import FITNET, distill_cfg, smaller


def test_check_finite_losses_names_the_terms():
    check_finite_losses({"loss_cls": torch.tensor(0.5), "loss_kd_fitnet_p2": 1.0}, 3)
    with pytest.raises(NonFiniteLossError) as e:
        check_finite_losses(
            {"loss_cls": torch.tensor(0.5), "loss_kd_fitnet_p2": torch.tensor(float("nan")),
             "loss_kd_fgd_global": torch.tensor(float("inf"))},
            17,
            "out/model_0000009.pth",
            {"fitnet": "DISTILL.FITNET", "fgd": "DISTILL.FGD"},
        )
    text = str(e.value)
    assert "iteration 17" in text and "loss_kd_fitnet_p2 = nan" in text and "loss_kd_fgd_global = inf" in text
    assert "loss_cls=0.5" in text and "out/model_0000009.pth" in text
    assert "DISTILL.FITNET.WEIGHT" in text and "DISTILL.FGD.WEIGHT" in text


@pytest.mark.train
def test_nan_term_stops_training_and_keeps_last_good_checkpoint(tmp_path, teacher_r18_weights):
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=3))
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.heads["fitnet"]
    original = head.forward

    def poisoned(student, teacher, step):
        terms = original(student, teacher, step)
        if step.iteration == 1:
            terms["p3"] = terms["p3"] * float("nan")
        return terms

    head.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: loss_kd_fitnet_p3 = nan.*model_0000000\.pth"):
        trainer.train()

    out = cfg.OUTPUT_DIR
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "model_*.pth"))) == ["model_0000000.pth"]
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000000.pth"
    saved = torch.load(os.path.join(out, "model_0000000.pth"), weights_only=True)
    # The failing step made no update: the live student still equals the last checkpoint.
    for k, v in trainer.student.state_dict().items():
        assert torch.isfinite(saved["model"][k].float()).all(), k
        assert torch.equal(saved["model"][k], v), f"{k} changed after the last good checkpoint"
