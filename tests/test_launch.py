"""d2kd.engine.launch: every worker destroys its process group once its work has returned."""

import pytest
import torch.distributed as dist

from d2kd.engine.launch import run_and_destroy_process_group


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_returns_the_result_and_destroys_the_group(gloo_group):
    assert dist.is_initialized()
    assert run_and_destroy_process_group(lambda a, b: a + b, 2, 3) == 5
    assert not dist.is_initialized()


def test_leaves_the_group_when_the_worker_raises(gloo_group):
    # The other ranks may never reach the barrier: no synchronisation on an error.
    def fail():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_and_destroy_process_group(fail)
    assert dist.is_initialized()


def test_without_a_group_it_only_calls(tmp_path):
    assert not dist.is_initialized()
    assert run_and_destroy_process_group(lambda: "single process") == "single process"
