"""Moved to :mod:`d2kd.heads.fgd.focal_global` (a method's own pieces live with its head)."""

raise ImportError("d2kd.losses.focal_global has moved to d2kd.heads.fgd.focal_global: import it from there.")
