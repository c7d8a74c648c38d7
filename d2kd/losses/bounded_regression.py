"""Moved to :mod:`d2kd.heads.chen2017.bounded_regression` (a method's own pieces live with its head)."""

raise ImportError("d2kd.losses.bounded_regression has moved to d2kd.heads.chen2017.bounded_regression: import it from there.")
