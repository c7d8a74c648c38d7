"""
Checkpoints read without running code.

- ``.pth`` (and every other extension Detectron2 hands to ``torch.load``):
  ``torch.load(..., weights_only=True)``, asked for explicitly: tensors, containers and the
  primitive types torch admits, never an arbitrary object.
- ``.pkl`` (Detectron2's model zoo and the MSRA/Caffe2 ImageNet weights): a restricted
  unpickler that admits only what those files hold — dicts, lists, tuples, strings, numbers,
  booleans, ``None`` and numpy arrays, scalars and dtypes. Any other global (a class, a
  function such as ``os.system`` or ``eval``) is an :class:`UnsafeFileError` naming the file
  and the global; nothing is called.

:class:`SafeDetectionCheckpointer` is Detectron2's ``DetectionCheckpointer`` reading files
this way; its zoo/Caffe2 handling (``matching_heuristics``, dropped ``_momentum`` blobs) is
Detectron2's own.
"""

import pickle
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .errors import UnsafeFileError

__all__ = ["read_checkpoint", "read_pkl_checkpoint", "SafeDetectionCheckpointer", "PKL_ALLOWED_GLOBALS"]

# The globals a model-zoo or MSRA .pkl names: numpy arrays, scalars and dtypes (numpy 1.x pickles
# name numpy.core, numpy 2.x numpy._core), the bytes of an array pickled under Python 3, and
# OrderedDict (a state dict).
PKL_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # Caffe2's Python 2 pickles, as Detectron2 reads them
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in PKL_ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"{self.path} asks to load '{module}.{name}', which a weights file does not need and which could "
            "run code; d2kd refused the file (nothing was run). Model-zoo and MSRA .pkl files hold only dicts, "
            "numbers, strings and numpy arrays. If the file comes from a source you trust, re-save its weights "
            "as tensors (torch.save({'model': state_dict}, 'weights.pth')) and load that; otherwise do not use it."
        )

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.path} uses pickle persistent ids, which no weights .pkl holds; refused.")


def read_pkl_checkpoint(path: str) -> Any:
    """The object pickled in ``path``, unpickled with :data:`PKL_ALLOWED_GLOBALS` only."""
    with PathManager.open(path, "rb") as f:
        return _RestrictedUnpickler(f, path).load()


def _torch_load_weights_only(path: str) -> Any:
    with PathManager.open(path, "rb") as f:
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            # A global the weights-only unpickler refuses (a class, a function) is a payload;
            # anything else (an unknown opcode: garbage, a truncated file) is a damaged file.
            refused = [line for line in str(e).splitlines() if "GLOBAL" in line]
            if not refused:
                raise
            raise UnsafeFileError(
                f"{path} holds objects other than tensors and plain containers, which could run code when "
                "loaded; d2kd loads checkpoints with weights_only=True and refused it (nothing was run)"
                + f": {refused[0].strip()}"
                + ". If the file comes from a source you trust, load it yourself and re-save its state dict "
                "(torch.save({'model': model.state_dict()}, 'weights.pth'))."
            ) from None


def read_checkpoint(path: str) -> Any:
    """``path`` as :class:`SafeDetectionCheckpointer` reads it before Detectron2's format handling."""
    return read_pkl_checkpoint(path) if path.endswith(".pkl") else _torch_load_weights_only(path)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    Detectron2's ``DetectionCheckpointer`` that never runs code from the file it loads: ``.pkl``
    through :func:`read_pkl_checkpoint`, everything else through ``torch.load(weights_only=True)``.
    Saving is Detectron2's.
    """

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pyth"):  # pycls weights (Detectron2 reads them with a plain torch.load)
            data = _torch_load_weights_only(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise ValueError(f"Cannot load .pyth file {filename}: pycls checkpoints hold 'model_state'.")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # reads through _torch_load
        data = read_pkl_checkpoint(filename)
        if not isinstance(data, dict):
            raise UnsafeFileError(f"{filename} holds a {type(data).__name__}, not a dict of weights.")
        if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 detection weights
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str):
        return _torch_load_weights_only(f)
