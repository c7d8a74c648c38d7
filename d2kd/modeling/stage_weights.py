"""Moved to :mod:`d2kd.heads.hgd.stage_weights` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.stage_weights has moved to d2kd.heads.hgd.stage_weights: import it from there.")
