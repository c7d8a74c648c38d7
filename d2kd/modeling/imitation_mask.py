"""Moved to :mod:`d2kd.heads.fgfi.imitation_mask` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.imitation_mask has moved to d2kd.heads.fgfi.imitation_mask: import it from there.")
