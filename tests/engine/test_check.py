"""The pre-flight check (train_net.py --check, d2kd.engine.check): what it prints, and how it fails."""

import tempfile

import pytest
import torch

from d2kd.engine.check import describe_shapes, run_check
from d2kd.heads.fitnet import FitNet

from conftest import FITNET, cli_args, distill_cfg, train_net


@pytest.mark.train
def test_check_prints_captures_adapters_losses_and_teacher_ap(tmp_path, teacher_r18_weights, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the check's own folder goes
    out = tmp_path / "run"
    args = cli_args(FITNET, out, teacher_r18_weights, ["DATASETS.TEST", "('bccd_test',)"], check=True, check_images=2)
    report = train_net.main(args)
    text = capsys.readouterr().out

    assert report.ok and not out.exists(), "the check never writes into OUTPUT_DIR"
    assert not list(tmp_path.glob("d2kd_check_*")), "a passed check removes its temporary folder"
    for phase in ("[check 1/4] building", "[check 2/4] reading one training batch",
                  "[check 3/4] one training step", "[check 4/4] evaluating the teacher on the first 2 images"):
        assert phase in text
    # Capture points with their shapes: FPN levels at the 128x192 padded input (strides 4..64).
    assert report.captures["student"]["backbone"].startswith("{p2: 2x128x32x48, p3: 2x128x16x24")
    assert report.captures["teacher"]["backbone"].startswith("{p2: 2x128x32x48")
    # 1x1 conv adapters 128 -> 128 channels: 128 * 128 weights + 128 biases each.
    assert report.modules["fitnet.pairing.adapters.p2"] == 128 * 128 + 128
    assert "fitnet: 82,560 trainable parameters" in text  # five of them
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_kd_fitnet_p2", "loss_kd_fitnet_p6"} <= set(report.losses)
    assert "x detector total" in text
    # A random teacher: AP ~ 0 is a warning, not an error.
    assert report.teacher_ap is not None and report.teacher_ap < 1.0
    assert any("teacher may be untrained" in w for w in report.warnings)
    assert "CHECK PASSED" in text


@pytest.mark.train
def test_check_fails_on_a_non_finite_term(tmp_path, teacher_r18_weights, monkeypatch, capsys):
    def nan_forward(self, student, teacher, step):
        return {"p2": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(FitNet, "forward", nan_forward)
    cfg = distill_cfg(FITNET, tmp_path, teacher_r18_weights)
    report = run_check(cfg, num_images=0)
    assert not report.ok
    assert any("loss_kd_fitnet_p2 is nan" in e for e in report.errors)
    assert "CHECK FAILED" in capsys.readouterr().out


def test_check_exits_non_zero_with_the_message(tmp_path, teacher_r18_weights, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = cli_args(FITNET, tmp_path / "run", teacher_r18_weights, ["DISTILL.HEADS", "['fitnett']"], check=True)
    with pytest.raises(SystemExit) as e:
        train_net.main(args)
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "ERROR: building the trainer: DistillConfigError: Unknown distillation head 'fitnett'" in text
    assert "CHECK FAILED" in text
    assert len(list(tmp_path.glob("d2kd_check_*"))) == 1, "a failed check keeps its log for inspection"


def test_describe_shapes():
    from detectron2.structures import Boxes, Instances

    inst = Instances((4, 4), proposal_boxes=Boxes(torch.zeros(3, 4)))
    assert describe_shapes({"p2": torch.zeros(2, 8, 4, 4), "x": [torch.zeros(5), inst]}) == "{p2: 2x8x4x4, x: [5, Instances(3)]}"
