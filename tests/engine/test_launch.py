"""d2kd.engine.launch: workers destroy their process group; spawned workers end before the interpreter's shutdown."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from d2kd.engine.launch import launch, run_and_destroy_process_group


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


# A worker process whose interpreter shutdown aborts, as a gloo worker sometimes does: an atexit
# handler calls os.abort(). run_spawned_worker must end it with code 0, its outputs complete.
_WORKER_SCRIPT = """
import atexit, logging, os, sys
from d2kd.engine.launch import run_spawned_worker

log_file, mode = sys.argv[1], sys.argv[2]
logger = logging.getLogger("worker")
logger.addHandler(logging.FileHandler(log_file))
logger.setLevel(logging.INFO)
atexit.register(os.abort)

def work(n):
    logger.info("trained %d iterations", n)
    print("result without a newline", end="")
    if mode == "raise":
        raise ValueError("worker failed")

run_spawned_worker(work, 3)
print("run_spawned_worker returned")
"""


def _run_worker_script(tmp_path, mode):
    log_file = tmp_path / "worker.log"
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_SCRIPT, str(log_file), mode], capture_output=True, text=True, timeout=120
    )
    return proc, log_file.read_text()


def test_spawned_worker_ends_with_code_0_before_the_interpreter_shutdown(tmp_path):
    proc, log = _run_worker_script(tmp_path, "return")
    assert proc.returncode == 0, proc.stderr  # os.abort at shutdown would give -6 (SIGABRT)
    assert proc.stdout == "result without a newline"  # flushed; the call did not return
    assert log == "trained 3 iterations\n"


def test_spawned_worker_that_raises_fails_as_before(tmp_path):
    proc, log = _run_worker_script(tmp_path, "raise")
    assert proc.returncode != 0
    assert "ValueError: worker failed" in proc.stderr
    assert log == "trained 3 iterations\n"


def test_single_process_launch_returns_to_its_caller():
    calls = []
    launch(calls.append, 1, args=("ran here",))
    assert calls == ["ran here"]


@pytest.mark.train
def test_check_launch_exit_tool_runs_two_processes(tmp_path):
    tool = Path(__file__).resolve().parents[2] / "tools" / "check_launch_exit.py"
    proc = subprocess.run(
        [sys.executable, str(tool), "--launcher", "d2kd", "--runs", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "d2kd launch, 2 processes: 0 of 1 launches failed" in proc.stdout


def test_a_single_machine_run_without_a_url_takes_a_free_port():
    from d2kd.engine.launch import default_dist_url, resolve_dist_url

    assert default_dist_url().startswith("tcp://127.0.0.1:")
    assert resolve_dist_url(default_dist_url(), num_machines=1) == "auto"
    assert resolve_dist_url(None, num_machines=1) == "auto"
    assert resolve_dist_url("tcp://127.0.0.1:12345", num_machines=1) == "tcp://127.0.0.1:12345"
    assert resolve_dist_url(default_dist_url(), num_machines=2) == default_dist_url()


def _listening_socket():
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.train
def test_two_runs_on_the_default_port_do_not_collide(monkeypatch):
    """The default port is taken (another run of this user): the launch goes on a free port."""
    import importlib

    d2kd_launch = importlib.import_module("d2kd.engine.launch")  # d2kd.engine.launch is also the function

    with _listening_socket() as taken:
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        monkeypatch.setattr(d2kd_launch, "default_dist_url", lambda: url)
        launch(print, 2, args=("worker ran",), dist_url=url)  # raised "address already in use" before


@pytest.mark.train
def test_a_given_url_in_use_names_dist_url():
    with _listening_socket() as taken:
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:\d+ is in use.*--dist-url"):
            launch(print, 2, args=("worker ran",), dist_url=url)
