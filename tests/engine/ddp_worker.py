"""
Worker of tests/engine/test_ddp.py: trains a few distillation iterations on N CPU processes (gloo)
through d2kd's ``launch`` (Detectron2's, with a clean worker exit), as train_net.py does, and
saves each rank's student and adapter weights.

    python tests/engine/ddp_worker.py OUT_DIR TEACHER_WEIGHTS NUM_PROCESSES
"""

import os
import sys

import torch
from detectron2.utils import comm

from d2kd.engine.launch import launch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest


def main(out_dir, teacher_weights):
    from conftest import distill_cfg

    from d2kd import DistillTrainer

    cfg = distill_cfg(
        "bccd/distill_fitnet_R50_R18.yaml",
        os.path.join(out_dir, "run"),
        teacher_weights,
        # Inheriting too: every rank copies the teacher's neck and heads after DDP wrapped the student.
        opts=["DISTILL.HEADS", ["fitnet", "kd"], "SEED", 3, "DISTILL.INHERIT.ENABLED", True],
        max_iter=3,
    )
    trainer = DistillTrainer(cfg)
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel), type(trainer.model)
    assert trainer.model.module.teacher is trainer.teacher
    assert not any(k.startswith("teacher") for k in trainer.model.module.state_dict())
    trainer.resume_or_load(resume=False)
    key = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(trainer.student.state_dict()[key], trainer.teacher.state_dict()[key]), "not inherited"
    trainer.train()
    state = {"student": trainer.student.state_dict(), "heads": trainer.heads.state_dict(), "iter": trainer.iter}
    torch.save(state, os.path.join(out_dir, f"rank{comm.get_rank()}.pth"))


if __name__ == "__main__":
    out_dir, teacher_weights, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    launch(main, n, dist_url="auto", args=(out_dir, teacher_weights))
