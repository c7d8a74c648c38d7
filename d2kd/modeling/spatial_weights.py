"""Moved to :mod:`d2kd.heads.hgd.spatial_weights` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.spatial_weights has moved to d2kd.heads.hgd.spatial_weights: import it from there.")
