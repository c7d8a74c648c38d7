"""
Reading the files a user gets from elsewhere — configs and checkpoints — without running code.

A downloaded teacher is a YAML config and a ``.pth`` or ``.pkl`` file; both formats can carry
Python that runs on load (a YAML ``!!python/object/apply`` tag, a pickled object's
``__reduce__``). d2kd reads every config and checkpoint through this package:

- :mod:`.yaml_config`: YAML with ``yaml.SafeLoader`` only, ``_BASE_`` chains with cycle
  detection, UTF-8 checked; a Python tag is an :class:`UnsafeFileError` naming the file, the
  line and the tag (Detectron2's one model-zoo expression, RetinaNet's anchor sizes, is read
  as the value it computes).
- :mod:`.checkpoints`: ``.pth`` with ``torch.load(weights_only=True)``; ``.pkl`` (the model
  zoo's and MSRA's format) through an unpickler that admits only dicts, lists, strings,
  numbers and numpy arrays and dtypes; :class:`SafeDetectionCheckpointer`, Detectron2's
  checkpointer reading files that way.

LazyConfig ``.py`` files are code by nature: d2kd runs one only when the user names it
(``DISTILL.TEACHER.CONFIG_FILE``), never one it finds.
"""

from .checkpoints import SafeDetectionCheckpointer, read_checkpoint, read_pkl_checkpoint
from .errors import ConfigFileError, UnsafeFileError
from .yaml_config import load_yaml_with_base, read_yaml

__all__ = [
    "ConfigFileError",
    "SafeDetectionCheckpointer",
    "UnsafeFileError",
    "load_yaml_with_base",
    "read_checkpoint",
    "read_pkl_checkpoint",
    "read_yaml",
]
