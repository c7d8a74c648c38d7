"""Moved to :mod:`d2kd.heads.chen2017.weighted_soft_ce` (a method's own pieces live with its head)."""

raise ImportError("d2kd.losses.weighted_soft_ce has moved to d2kd.heads.chen2017.weighted_soft_ce: import it from there.")
