"""Moved to :mod:`d2kd.heads.gkd.prototype_hook`; this alias will be removed in the next release."""

import warnings

from ..heads.gkd.prototype_hook import *  # noqa: F401,F403
from ..heads.gkd.prototype_hook import __all__  # noqa: F401

warnings.warn(
    "d2kd.engine.prototype_hook has moved to d2kd.heads.gkd.prototype_hook; import it from there.",
    DeprecationWarning,
    stacklevel=2,
)
