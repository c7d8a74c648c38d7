from .checkpoint import SafeCheckpointer
from .trainer import DistillTrainer

__all__ = ["DistillTrainer", "SafeCheckpointer"]
