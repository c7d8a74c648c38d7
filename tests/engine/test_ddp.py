"""A 2-process CPU run (gloo) through Detectron2's launch, as `--num-gpus 2` does."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.train
def test_two_process_run_keeps_ranks_in_sync(tmp_path, teacher_r18_weights):
    worker = os.path.join(REPO, "tests", "engine", "ddp_worker.py")
    result = subprocess.run(
        [sys.executable, worker, str(tmp_path), teacher_r18_weights, "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert ranks[0]["iter"] == ranks[1]["iter"] == 3  # max_iter, as TrainerBase leaves it
    for part in ("student", "heads"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for k, v in ranks[0][part].items():
            torch.testing.assert_close(v, ranks[1][part][k], rtol=1e-5, atol=1e-6, msg=f"{part} {k} differs between ranks")
    # Only rank 0 writes checkpoints; it wrote the final one.
    assert os.path.isfile(tmp_path / "run" / "model_final.pth")
