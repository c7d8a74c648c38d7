"""Moved to :mod:`d2kd.heads.hgd.stage_matching` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.stage_matching has moved to d2kd.heads.hgd.stage_matching: import it from there.")
