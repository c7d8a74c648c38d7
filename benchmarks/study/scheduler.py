"""
Runs a list of tasks, several at a time, each only after the tasks it depends on succeeded.

The accuracy study uses it to train runs side by side (``--jobs``): on a CPU, two runs with one
thread each get more done than one run with two threads, because a training step does not
scale linearly with intra-op threads. The callbacks run in the calling thread, so they may
write shared results without locks; only ``run`` runs in worker threads.
"""

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Dict, Hashable, Iterable, List, Sequence, TypeVar

__all__ = ["run_with_dependencies"]

T = TypeVar("T")


def run_with_dependencies(
    tasks: Sequence[T],
    run: Callable[[T], object],
    max_parallel: int,
    key: Callable[[T], Hashable],
    depends_on: Callable[[T], Iterable[Hashable]],
    on_start: Callable[[T], None] = lambda task: None,
    on_success: Callable[[T, object], None] = lambda task, result: None,
    on_failure: Callable[[T, BaseException], None] = lambda task, error: None,
    failure_types: tuple = (Exception,),
) -> Dict[str, List[T]]:
    """
    Start tasks in list order as soon as a slot is free and their dependencies (keys of
    other tasks in ``tasks``) have succeeded; dependencies outside ``tasks`` count as met.

    A task raising one of ``failure_types`` is reported to ``on_failure`` and the others go
    on; tasks depending on it (directly or not) are never started. Any other exception
    stops the scheduling: it is raised after the running tasks have ended.

    Returns ``{"succeeded": [...], "failed": [...], "blocked": [...]}``.
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}.")
    keys = {key(t) for t in tasks}
    pending = list(tasks)
    succeeded, failed = [], []
    done_keys, failed_keys = set(), set()

    def ready(task) -> bool:
        return all(d in done_keys for d in depends_on(task) if d in keys)

    def blocked(task) -> bool:
        return any(d in failed_keys for d in depends_on(task) if d in keys)

    with ThreadPoolExecutor(max_workers=max_parallel) as pool:
        running = {}
        fatal = None
        while True:
            for task in [t for t in pending if blocked(t)]:
                pending.remove(task)
                failed_keys.add(key(task))  # its dependants are blocked too
            while fatal is None and len(running) < max_parallel:
                task = next((t for t in pending if ready(t)), None)
                if task is None:
                    break
                pending.remove(task)
                on_start(task)
                running[pool.submit(run, task)] = task
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                error = future.exception()
                if error is None:
                    done_keys.add(key(task))
                    succeeded.append(task)
                    on_success(task, future.result())
                elif isinstance(error, failure_types):
                    failed_keys.add(key(task))
                    failed.append(task)
                    on_failure(task, error)
                elif fatal is None:
                    fatal = error
        if fatal is not None:
            raise fatal
    blocked_tasks = [t for t in tasks if key(t) in failed_keys and t not in failed]
    return {"succeeded": succeeded, "failed": failed, "blocked": blocked_tasks}
