"""Checkpoints: a crash while saving keeps the previous one; a resume restores every training state."""

import os

import pytest
import torch
from detectron2.engine import HookBase
from torch import nn

from d2kd import DistillTrainer
from d2kd.engine.checkpoint import SafeCheckpointer

from conftest import FITNET, distill_cfg, smaller


def test_a_full_disk_names_the_intact_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import d2kd.engine.checkpoint as checkpoint_module
    from d2kd.engine.checkpoint import CheckpointWriteError

    checkpointer = SafeCheckpointer(nn.Linear(3, 2), str(tmp_path))
    checkpointer.save("model_0000000")

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PARTIAL")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.save("model_0000001")
    message = str(raised.value)
    assert message.startswith(f"Could not write the checkpoint {tmp_path / 'model_0000001.pth'} (No space left on device).")
    assert f"the previous checkpoint {tmp_path / 'model_0000000.pth'} is intact" in message
    assert "last_checkpoint still names it" in message and "--resume" in message
    assert isinstance(raised.value, OSError)  # still an OSError for callers that catch those
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    checkpointer = SafeCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    import d2kd.engine.checkpoint as checkpoint_module

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL" * 100)  # half a file reached the disk, then the process "crashes"
        raise OSError("No space left on device")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        checkpointer.save("model_0000001")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    restored = nn.Linear(3, 2)
    SafeCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in restored.state_dict().items():
        assert torch.equal(v, before[k])


class _Counter(HookBase):
    """Changes a head buffer every step, standing in for any head state (prototypes, EMA...)."""

    def __init__(self, head):
        self.head = head

    def after_step(self):
        self.head.robust_probe += 1.0


@pytest.mark.train
def test_resume_restores_optimizer_scheduler_iteration_and_head_state(tmp_path, teacher_r18_weights):
    cfg = smaller(distill_cfg(FITNET, tmp_path, teacher_r18_weights, max_iter=2))
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = (1,), 0.5  # an LR decay inside the first run
    first = DistillTrainer(cfg)
    first.heads["fitnet"].register_buffer("robust_probe", torch.zeros(2))
    first.register_hooks([_Counter(first.heads["fitnet"])])
    first._hooks.insert(0, first._hooks.pop())  # before the checkpointer, like a head's own hook
    first.resume_or_load(resume=False)
    first.train()
    assert first.heads["fitnet"].robust_probe.tolist() == [2.0, 2.0]

    cfg.defrost()
    cfg.SOLVER.MAX_ITER = 4
    second = DistillTrainer(cfg)
    second.heads["fitnet"].register_buffer("robust_probe", torch.zeros(2))
    second.resume_or_load(resume=True)

    assert second.start_iter == 2
    assert second.heads["fitnet"].robust_probe.tolist() == [2.0, 2.0]
    assert second.scheduler.last_epoch == first.scheduler.last_epoch == 2
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"])
    assert second.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)  # the decay at step 1 is kept
    a, b = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert a and set(a) == set(b)
    for i in a:
        for key, value in a[i].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[i][key]), f"optimizer state {i}/{key}"
    for k, v in first.heads.state_dict().items():
        assert torch.equal(v, second.heads.state_dict()[k]), k
