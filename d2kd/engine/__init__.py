from .checkpoint import SafeCheckpointer
from .launch import launch
from .trainer import DistillTrainer

__all__ = ["DistillTrainer", "SafeCheckpointer", "launch"]
