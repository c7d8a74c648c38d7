"""Moved to :mod:`d2kd.heads.gkd.prototypes` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.prototypes has moved to d2kd.heads.gkd.prototypes: import it from there.")
