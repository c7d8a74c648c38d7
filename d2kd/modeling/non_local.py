"""Moved to :mod:`d2kd.heads.fbkd.non_local` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.non_local has moved to d2kd.heads.fbkd.non_local: import it from there.")
