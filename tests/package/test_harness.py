"""The test harness of tests/conftest.py: log capture under every admitted pytest, and the two tiers."""

import logging
import subprocess
import sys

import pytest
import torch
from detectron2.engine import SimpleTrainer, TrainerBase

import conftest


@pytest.fixture
def d2kd_not_propagating():
    """The "d2kd" logger as train_net's setup_logger(name="d2kd") leaves it, from before the test body."""
    logger = logging.getLogger("d2kd")
    before = logger.propagate
    logger.propagate = False
    yield
    logger.propagate = before


def test_d2kd_logs_sees_each_record_once_when_d2kd_does_not_propagate(d2kd_not_propagating, d2kd_logs):
    logs = d2kd_logs("d2kd.harness_probe", logging.WARNING)
    logging.getLogger("d2kd.harness_probe").warning("probe %d", 1)
    logging.getLogger("d2kd.harness_probe").info("below the level")
    assert [r.getMessage() for r in logs.records if r.name == "d2kd.harness_probe"] == ["probe 1"]


def test_d2kd_logs_restores_propagation(d2kd_not_propagating, d2kd_logs):
    d2kd_logs("d2kd.harness_probe")
    assert logging.getLogger("d2kd").propagate  # for this test only: d2kd_not_propagating checks nothing


def test_log_messages_collects_a_loggers_messages_once(d2kd_not_propagating):
    with conftest.log_messages("d2kd.harness_probe") as messages:
        logging.getLogger("d2kd.harness_probe").info("inside")
    logging.getLogger("d2kd.harness_probe").info("outside")
    assert messages == ["inside"]


MARK_MESSAGE = r"this test trains a detector: mark it @pytest\.mark\.train"


def test_a_trainer_step_outside_the_train_tier_names_the_marker():
    trainer = SimpleTrainer(torch.nn.Linear(1, 1), [], torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))
    with pytest.raises(pytest.fail.Exception, match=MARK_MESSAGE + r" \(it calls TrainerBase\.train\(\)"):
        TrainerBase.train(trainer, 0, 1)
    with pytest.raises(pytest.fail.Exception, match=MARK_MESSAGE + r" \(it calls SimpleTrainer\.run_step\(\)"):
        trainer.run_step()


def test_a_backward_pass_through_a_detector_sized_model_names_the_marker():
    small = torch.nn.Linear(10, 10)
    small(torch.ones(1, 10)).sum().backward()  # a toy module: allowed
    assert small.weight.grad is not None
    large = torch.nn.Linear(1000, conftest.DETECTOR_PARAMETERS // 1000 + 1, bias=False)
    refused = MARK_MESSAGE + r" \(it runs a backward pass through 1001000 parameters"
    with pytest.raises(pytest.fail.Exception, match=refused):
        large(torch.ones(1, 1000)).sum().backward()
    assert large.weight.grad is None


def test_scripts_and_worker_processes_outside_the_train_tier_name_the_marker(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=MARK_MESSAGE + r" \(it runs the script train_net\.py"):
        subprocess.run([sys.executable, "train_net.py", "--help"], capture_output=True)
    with pytest.raises(pytest.fail.Exception, match=MARK_MESSAGE + r" \(it starts worker processes"):
        torch.multiprocessing.spawn(print, nprocs=2)
    # `python -c` and other programs are not refused.
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"


@pytest.mark.train
def test_a_train_test_is_not_guarded():
    assert subprocess.Popen.__name__ == "Popen" and TrainerBase.train.__name__ == "train"
