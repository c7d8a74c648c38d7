"""
Memory of a training step, for ``benchmarks/overhead.py``: the tensors a phase keeps
(:func:`tensor_bytes`: parameters, buffers, optimizer state) and the transient peak of a block
(:class:`MemoryProbe`: on CPU the peak resident set size, VmHWM, reset through
``/proc/self/clear_refs`` after ``malloc_trim``; on a GPU ``torch.cuda.max_memory_allocated``).
"""

import contextlib
import ctypes
import gc
import itertools
from typing import List

import torch


class MemoryProbe:
    """Transient peak memory of a block: CPU via VmHWM reset, CUDA via max_memory_allocated."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else ("rss" if _can_reset_hwm() else None)
        self._libc = None
        if self.kind == "rss":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @property
    def available(self) -> bool:
        return self.kind is not None

    @contextlib.contextmanager
    def measure(self, out: List[float]):
        """Appends the transient peak (bytes) of the block to ``out``."""
        gc.collect()
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            out.append(max(0, torch.cuda.max_memory_allocated(self.device) - before))
        elif self.kind == "rss":
            if self._libc is not None:
                self._libc.malloc_trim(0)  # give freed heap back, so the next peak is seen
            _reset_hwm()
            before = _proc_status("VmRSS")
            yield
            out.append(max(0, _proc_status("VmHWM") - before))
        else:
            yield


def _can_reset_hwm() -> bool:
    try:
        _reset_hwm()
        return _proc_status("VmHWM") > 0
    except OSError:
        return False


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def tensor_bytes(*sources) -> int:
    """Bytes of the distinct tensors of modules (parameters + buffers) and optimizers (state)."""
    seen, total = set(), 0
    for source in sources:
        if isinstance(source, torch.nn.Module):
            tensors = itertools.chain(source.parameters(), source.buffers())
        elif isinstance(source, torch.optim.Optimizer):
            tensors = (v for state in source.state.values() for v in state.values() if torch.is_tensor(v))
        else:
            tensors = source
        for t in tensors:
            key = (t.device, t.data_ptr(), t.nbytes)
            if t.nbytes and key not in seen:
                seen.add(key)
                total += t.nbytes
    return total
