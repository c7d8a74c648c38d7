"""
Detectron2's ``launch`` with a clean exit of every worker process.

A gloo worker sometimes dies at interpreter exit with SIGABRT ("terminate called without an
active exception") after its work is done, so ``train_net.py --num-gpus 2`` on CPU can report a
finished run as failed. Each worker therefore waits for the others and destroys the process group
before it returns. Measured here (2-process CPU runs): the GKD test's worker aborted in 5 of 30
runs with Detectron2's launch and 0 of 50 with this one. A worker that only all-gathers one
integer aborted in 1 of 30 either way, so the teardown removes the common cause, not every one.
"""

import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["launch", "run_and_destroy_process_group"]


def run_and_destroy_process_group(main_func, *args):
    """
    Call ``main_func(*args)``; if it returns, synchronise the ranks and destroy the default
    process group (a no-op when none was initialised, e.g. a single process). If it raises, the
    group is left as it is: the other ranks may never reach the barrier.
    """
    result = main_func(*args)
    if dist.is_available() and dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


def launch(main_func, num_gpus_per_machine, *, args=(), **kwargs):
    """``detectron2.engine.launch`` with the same arguments; every worker runs
    :func:`run_and_destroy_process_group`. ``main_func`` must be picklable, as for Detectron2."""
    detectron2_launch(run_and_destroy_process_group, num_gpus_per_machine, args=(main_func, *args), **kwargs)
