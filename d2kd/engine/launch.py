"""
Detectron2's ``launch`` with a clean exit of every worker process.

A gloo worker sometimes dies at interpreter exit with SIGABRT ("terminate called without an
active exception") after its work is done, so ``train_net.py --num-gpus 2`` on CPU can report a
finished run as failed. Two measures, applied in this order:

1. Each worker waits for the others and destroys the process group before it returns. This
   removes the common cause of the abort, not every one.
2. A spawned worker whose work has returned then flushes its logs and standard streams and ends
   with ``os._exit(0)``, as a forked ``multiprocessing`` child always does. The interpreter's
   shutdown, where the abort happens, never runs in a worker. A worker that raises exits as before
   (Detectron2 and ``torch.multiprocessing`` report its traceback), and a single-process launch
   (``--num-gpus 1``) returns to its caller.

``tools/check_launch_exit.py`` counts the failed exits of repeated 2-process launches, with
Detectron2's launch or this one.

Ports: Detectron2's ``--dist-url`` default is one port per user id, so two multi-process runs
of one user on one machine collide ("address already in use"). A single-machine launch with
that default (the user gave no ``--dist-url``) takes a free port instead (Detectron2's
``dist_url="auto"``); a run whose given URL is taken fails with an error that names the URL and
``--dist-url``.
"""

import logging
import os
import sys

import torch.distributed as dist
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

__all__ = ["launch", "run_and_destroy_process_group", "run_spawned_worker", "default_dist_url", "resolve_dist_url"]


def default_dist_url() -> str:
    """Detectron2's ``--dist-url`` default (``default_argument_parser``): a port derived from the user id."""
    from detectron2.engine import default_argument_parser

    return default_argument_parser().get_default("dist_url")


def resolve_dist_url(dist_url, num_machines: int = 1):
    """``"auto"`` (a free local port) for a single-machine run given no URL or Detectron2's
    per-user default; else ``dist_url`` unchanged."""
    if num_machines == 1 and (not dist_url or dist_url == default_dist_url()):
        return "auto"
    return dist_url


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


def run_spawned_worker(main_func, *args):
    """
    Body of one process spawned by :func:`launch`: :func:`run_and_destroy_process_group`, then,
    once the work has returned, flush every logging handler (Detectron2's log files included) and
    the standard streams and end the process with exit code 0 without the interpreter's shutdown.
    Never call it in a process that must go on: it does not return.
    """
    run_and_destroy_process_group(main_func, *args)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(main_func, num_gpus_per_machine, *, args=(), **kwargs):
    """``detectron2.engine.launch`` with the same arguments. Spawned workers (world size > 1) run
    :func:`run_spawned_worker`; a single process runs :func:`run_and_destroy_process_group` and
    returns. ``main_func`` must be picklable, as for Detectron2."""
    num_machines = kwargs.get("num_machines", 1)
    world_size = num_machines * num_gpus_per_machine
    worker = run_spawned_worker if world_size > 1 else run_and_destroy_process_group
    if world_size > 1:
        kwargs["dist_url"] = resolve_dist_url(kwargs.get("dist_url"), num_machines)
    try:
        detectron2_launch(worker, num_gpus_per_machine, args=(main_func, *args), **kwargs)
    except Exception as e:
        if "address already in use" not in str(e).lower():
            raise
        raise RuntimeError(
            f"The distributed URL {kwargs.get('dist_url')} is in use (another multi-process run on this machine?). "
            "Pass a free one with --dist-url tcp://127.0.0.1:<port>, or leave --dist-url out on a single machine "
            "so that a free port is chosen."
        ) from e
