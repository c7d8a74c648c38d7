"""
Capture of intermediate outputs by forward hooks.

A :class:`Recorder` is attached once to one model (teacher or student). It registers a
forward hook on each named module target and wraps each named method target (e.g.
``roi_heads.label_and_sample_proposals``, which is not a module). Hooks record only inside
``with recorder.recording():`` -- the training step -- so evaluation forwards are never
captured, and every step starts from empty buffers. A module called several times in one
step (a head shared over FPN levels) yields several records, in call order.
"""

import contextlib
import difflib
import functools
from collections import defaultdict
from typing import Any, Dict, List, Sequence, Tuple

from torch import nn

__all__ = ["Recorder", "Records", "CaptureTargetError"]


class CaptureTargetError(KeyError):
    """A capture target names a module or method the model does not have."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


def _nearby_names(target: str, names: Sequence[str]) -> List[str]:
    close = difflib.get_close_matches(target, names, n=6, cutoff=0.5)
    # Also list the children of the deepest existing prefix of the target.
    parts = target.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        if prefix == "" or prefix in names:
            children = [
                n for n in names if n.startswith(prefix) and n.count(".") == (prefix.count(".") + 1 if prefix else 0)
            ]
            close += [c for c in children[:12] if c not in close]
            break
    return close


def resolve_module(model: nn.Module, target: str, role: str = "model") -> nn.Module:
    """Return ``model``'s submodule named ``target``; a clear error lists nearby names."""
    modules = dict(model.named_modules())
    if target in modules:
        return modules[target]
    raise CaptureTargetError(
        f"The {role} has no module named '{target}'. Nearby module names: "
        f"{_nearby_names(target, [n for n in modules if n])}. Check the capture target "
        f"(module paths are those of `model.named_modules()`)."
    )


class Records:
    """What one forward recorded: for each target, a list of (inputs, output) in call order."""

    def __init__(self, data: Dict[str, List[Tuple[Any, Any]]]):
        self._data = dict(data)

    def __contains__(self, target: str) -> bool:
        return target in self._data

    def _entries(self, target: str) -> List[Tuple[Any, Any]]:
        if target not in self._data:
            raise KeyError(
                f"Nothing was recorded for '{target}' in this step (recorded: {sorted(self._data)}). "
                "Did the head declare it among its capture targets, and did that part run?"
            )
        return self._data[target]

    def outputs(self, target: str) -> List[Any]:
        """All outputs of ``target`` in this step, in call order."""
        return [out for _, out in self._entries(target)]

    def output(self, target: str) -> Any:
        """The single output of ``target``; an error if it ran more or less than once."""
        outputs = self.outputs(target)
        if len(outputs) != 1:
            raise RuntimeError(f"'{target}' ran {len(outputs)} times in this step; use outputs().")
        return outputs[0]

    def inputs(self, target: str) -> Tuple[Any, ...]:
        """The positional inputs of the single call of ``target``."""
        entries = self._entries(target)
        if len(entries) != 1:
            raise RuntimeError(f"'{target}' ran {len(entries)} times in this step.")
        return entries[0][0]


class Recorder:
    """
    Records outputs of named modules (forward hooks) and methods (wrappers) of one model.

    Args:
        model: the model to observe; hooks are registered once, here.
        module_targets: dotted module paths, e.g. ``"backbone"``, ``"roi_heads.box_predictor"``.
        method_targets: dotted method paths, e.g. ``"roi_heads.label_and_sample_proposals"``.
        role: "teacher" or "student", used in error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        module_targets: Sequence[str] = (),
        method_targets: Sequence[str] = (),
        role: str = "model",
    ):
        self._active = False
        self._data: Dict[str, List[Tuple[Any, Any]]] = defaultdict(list)
        self._handles = []
        self.module_targets = tuple(dict.fromkeys(module_targets))
        self.method_targets = tuple(dict.fromkeys(method_targets))
        for target in self.module_targets:
            module = resolve_module(model, target, role)
            self._handles.append(module.register_forward_hook(self._module_hook(target)))
        for target in self.method_targets:
            owner_path, _, method_name = target.rpartition(".")
            owner = resolve_module(model, owner_path, role) if owner_path else model
            method = getattr(owner, method_name, None)
            if not callable(method):
                raise CaptureTargetError(
                    f"The {role}'s module '{owner_path or type(model).__name__}' "
                    f"({type(owner).__name__}) has no method '{method_name}'."
                )
            setattr(owner, method_name, self._method_wrapper(target, method))

    def _module_hook(self, target: str):
        def hook(module, inputs, output):
            if self._active:
                self._data[target].append((inputs, output))

        return hook

    def _method_wrapper(self, target: str, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            output = method(*args, **kwargs)
            if self._active:
                self._data[target].append((args, output))
            return output

        return wrapper

    @contextlib.contextmanager
    def recording(self):
        """Record inside this block only; buffers are cleared when it starts."""
        self._data.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def pop(self) -> Records:
        """Hand over what was recorded and clear the buffers."""
        records = Records(self._data)
        self._data = defaultdict(list)
        return records

    def remove(self):
        """Remove the forward hooks (method wrappers stay, inert when not recording)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
