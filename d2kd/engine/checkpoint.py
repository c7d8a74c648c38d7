"""Checkpoints written atomically: a crash mid-write leaves the previous file intact."""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["SafeCheckpointer", "atomic_write_bytes"]


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


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` tag are atomic."""

    def save(self, name: str, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        atomic_write_bytes(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str):
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write_bytes(path, lambda f: f.write(last_filename_basename), mode="w")
