"""Moved to :mod:`d2kd.heads.fgd.gc_block` (a method's own pieces live with its head)."""

raise ImportError("d2kd.modeling.gc_block has moved to d2kd.heads.fgd.gc_block: import it from there.")
