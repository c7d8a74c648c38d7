"""
d2kd's checkpointer: checkpoints written atomically (a crash mid-write leaves the previous file
intact), never with non-finite values, and read with errors that name the file and what to do.
"""

import glob
import os
from typing import Iterator, List, Optional

import torch

from ..files import SafeDetectionCheckpointer
from ..modeling.teacher import read_checkpoint_file
from .hooks import TrainingDivergedError, divergence_message, head_option_nodes, likely_fixes

__all__ = ["SafeCheckpointer", "head_options", "atomic_write_bytes", "nonfinite_entries", "ResumeMismatchError", "CheckpointWriteError"]


class ResumeMismatchError(ValueError):
    """``--resume`` into a run trained with other distillation heads than the config's."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the previous one is intact."""


def atomic_write_bytes(path: str, write_fn, mode: str = "wb"):
    """
    Write through ``write_fn(file)`` into ``path + '.tmp'``, fsync, then rename over ``path``.
    If writing fails, the partial temporary file is removed and ``path`` is untouched.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def nonfinite_entries(obj, prefix: str = "") -> Iterator[str]:
    """Paths (``model/backbone...weight``, ``trainer/_trainer/optimizer/state/3/exp_avg``) of the
    floating-point tensors of a nested dict/list holding a NaN or an inf."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield prefix
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_entries(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nonfinite_entries(v, f"{prefix}/{i}")


def head_options(cfg, heads) -> dict:
    """``{head: {"DISTILL.<KEY>.<OPTION>": value}}``: the options node of each built head, flattened."""
    out = {}
    for name, head in heads.items():
        key = type(head).config_key()
        out[name] = _flatten(cfg.DISTILL[key], f"DISTILL.{key}") if key in cfg.DISTILL else {}
    return out


def _flatten(node, prefix: str) -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}.{key}"))
        else:
            flat[f"{prefix}.{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def _head_names(state_dict) -> List[str]:
    """The heads that own entries of a ``"distiller"`` state dict (``<head>.<key>``)."""
    return sorted({k.split(".", 1)[0] for k in state_dict})


class SafeCheckpointer(SafeDetectionCheckpointer):
    """
    ``DetectionCheckpointer`` that reads files without running code (:mod:`d2kd.files`), whose
    ``save`` and ``last_checkpoint`` tag are atomic, and which

    - names the intact previous checkpoint when one cannot be written (a full disk):
      :class:`CheckpointWriteError`;

    - refuses to save a state with a non-finite value (parameters, buffers, optimizer state):
      it raises :class:`~d2kd.engine.hooks.TrainingDivergedError` instead, so
      ``last_checkpoint`` always names a finite checkpoint to resume from;
    - names the file and its origin when one cannot be read: ``MODEL.WEIGHTS``, or on a resume
      the last checkpoint, with the previous intact ``model_*.pth`` of the folder;
    - on a resume, checks the checkpoint was trained with the same distillation heads as the
      ``"distiller"`` checkpointable (:class:`ResumeMismatchError` names the difference).
    """

    # The config key of the weights a non-resumed run loads (DefaultTrainer.resume_or_load).
    weights_option = "MODEL.WEIGHTS"
    _resuming = False

    def __init__(self, model, save_dir: str = "", *, head_options: Optional[dict] = None, **checkpointables):
        """
        ``head_options``: ``{head: {"DISTILL.<KEY>.<OPTION>": value}}`` of the run's heads
        (:func:`head_options`), saved in every checkpoint so that a resume with other options
        names them.
        """
        super().__init__(model, save_dir, **checkpointables)
        self.head_options = head_options or {}

    def save(self, name: str, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        if self.head_options:
            data["head_options"] = self.head_options
        basename = f"{name}.pth"
        self._check_finite(data, basename)
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        try:
            atomic_write_bytes(save_file, lambda f: torch.save(data, f))
        except OSError as e:
            raise CheckpointWriteError(self._write_failure_message(save_file, e)) from e
        self.tag_last_checkpoint(basename)

    def _write_failure_message(self, save_file: str, error: OSError) -> str:
        reason = error.strerror or str(error)
        if os.path.exists(save_file):
            intact = f"{save_file} is untouched (the new state went to a temporary file, now removed)"
        elif self.has_checkpoint():
            intact = (
                f"the previous checkpoint {self.get_checkpoint_file()} is intact and "
                f"{os.path.join(self.save_dir, 'last_checkpoint')} still names it"
            )
        else:
            intact = "no earlier checkpoint of this run exists"
        return (
            f"Could not write the checkpoint {save_file} ({reason}). Nothing was damaged: {intact}. Free space "
            "on that disk (or set OUTPUT_DIR to another one) and continue with --resume."
        )

    def _check_finite(self, data, basename: str):
        bad = list(nonfinite_entries(data))
        if not bad:
            return
        iteration = data.get("iteration", "?")
        problem = (
            f"Training diverged: the state after iteration {iteration} holds non-finite values in {len(bad)} "
            f"tensor(s): {bad[:6]}{' ...' if len(bad) > 6 else ''}. {basename} was not saved."
        )
        last = self.get_checkpoint_file() if self.has_checkpoint() else None
        fixes = likely_fixes(list(head_option_nodes(self.checkpointables.get("distiller", {})).values()))
        raise TrainingDivergedError(divergence_message(problem, last, fixes, before_update=False))

    def tag_last_checkpoint(self, last_filename_basename: str):
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_bytes(path, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        """fvcore's ``load``; restoring every state (``checkpointables=None``, a resume) first
        checks the checkpoint's distillation heads (:meth:`_check_same_heads`)."""
        self._resuming = checkpointables is None
        try:
            return super().load(path, checkpointables)
        finally:
            self._resuming = False

    def _load_file(self, f: str):
        last = self.get_checkpoint_file() if self.save_dir and self.has_checkpoint() else ""
        if last and os.path.abspath(f) == os.path.abspath(last):
            option = f"The last checkpoint of OUTPUT_DIR (named in {os.path.join(self.save_dir, 'last_checkpoint')})"
            checkpoint = read_checkpoint_file(super()._load_file, f, option, lambda: self._previous_intact_advice(f))
        else:
            checkpoint = read_checkpoint_file(super()._load_file, f, self.weights_option)
        if self._resuming:
            self._check_same_heads(checkpoint, f)
        return checkpoint

    def _previous_intact_advice(self, broken: str) -> str:
        """Where to resume from instead of the unreadable ``broken``: the newest readable ``model_*.pth``."""
        names = [os.path.basename(p) for p in glob.glob(os.path.join(self.save_dir, "model_*.pth"))]
        names = sorted(names, key=lambda n: (n == "model_final.pth", n), reverse=True)
        for name in names:
            path = os.path.join(self.save_dir, name)
            if os.path.abspath(path) == os.path.abspath(broken):
                continue
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                continue
            return (
                f"The previous intact checkpoint is {path}: to resume from it, write '{name}' into "
                f"{os.path.join(self.save_dir, 'last_checkpoint')} and run with --resume again."
            )
        return (
            f"No other readable model_*.pth is in {self.save_dir}: start the run again without --resume "
            "(with --overwrite, or in another OUTPUT_DIR)."
        )

    def _check_same_head_options(self, checkpoint, path: str):
        """
        The heads' state in the checkpoint must have the keys and shapes of the built heads;
        otherwise (e.g. fitnet trained on other IN_FEATURES) loading would fail in the
        optimizer with an opaque ``ValueError``. The error names the options that differ.
        """
        heads = self.checkpointables.get("distiller")
        if heads is None:
            return
        saved_state = checkpoint.get("distiller", {})
        current_state = heads.state_dict()
        saved_shapes = {k: tuple(v.shape) for k, v in saved_state.items() if hasattr(v, "shape")}
        current_shapes = {k: tuple(v.shape) for k, v in current_state.items()}
        if saved_shapes == current_shapes:
            return
        differing_heads = sorted(
            {k.split(".", 1)[0] for k in set(saved_shapes) ^ set(current_shapes)}
            | {k.split(".", 1)[0] for k in set(saved_shapes) & set(current_shapes) if saved_shapes[k] != current_shapes[k]}
        )
        saved_options = checkpoint.get("head_options") or {}
        changes = []
        for head in differing_heads:
            before, now = saved_options.get(head, {}), self.head_options.get(head, {})
            changes += [
                f"{key} was {before.get(key)!r} in the run, is {now.get(key)!r} now"
                for key in sorted(set(before) | set(now))
                if before.get(key) != now.get(key)
            ]
        if changes:
            what = "other head options: " + "; ".join(changes)
        else:
            keys = sorted(set(saved_shapes) ^ set(current_shapes))[:6]
            what = f"other head options (the heads' trainable state differs, e.g. {keys or differing_heads})"
        raise ResumeMismatchError(
            f"Cannot resume from {path}: the run's heads {differing_heads} were trained with {what}. Resume "
            "with the options the run was started with, or start a new run (another OUTPUT_DIR, or --overwrite); "
            f"to start the new options from this run's student, set MODEL.WEIGHTS {path} without --resume."
        )

    def _check_same_heads(self, checkpoint, path: str):
        """
        The heads with trainable state in the checkpoint's ``"distiller"`` entry must be those of
        the ``"distiller"`` checkpointable (the config's DISTILL.HEADS); otherwise the optimizer's
        parameter groups differ and loading would fail with an opaque ``ValueError``.
        """
        heads = self.checkpointables.get("distiller")
        saved = _head_names(checkpoint.get("distiller", {}))
        configured = _head_names(heads.state_dict()) if heads is not None else []
        if saved == configured:
            self._check_same_head_options(checkpoint, path)
            return
        config_heads = list(heads.keys()) if heads is not None else []
        difference = "; ".join(
            f"{text}: {names}"
            for text, names in (
                ("only in the checkpoint", sorted(set(saved) - set(configured))),
                ("only in the config", sorted(set(configured) - set(saved))),
            )
            if names
        )
        raise ResumeMismatchError(
            f"Cannot resume from {path}: its 'distiller' entry holds the heads {saved}, the config's "
            f"DISTILL.HEADS is {config_heads} (heads with trainable state: {configured}); {difference}. "
            "Resume with the DISTILL.HEADS the run was started with, or start a new run (another OUTPUT_DIR, "
            f"or --overwrite); to start the new heads from this run's student, set MODEL.WEIGHTS {path} "
            "without --resume."
        )
