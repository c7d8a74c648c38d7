"""Chen et al. 2017, "Learning Efficient Object Detection Models with Knowledge Distillation"
(docs/methods/chen2017.md): the head and its losses (weighted soft labels, teacher-bounded regression)."""

from .bounded_regression import REGRESSION_NORMS, regression_distance, teacher_bounded_regression
from .head import Chen2017
from .weighted_soft_ce import (
    background_last_class_weights,
    binary_weighted_soft_cross_entropy,
    weighted_soft_cross_entropy,
)

__all__ = [
    "Chen2017",
    "REGRESSION_NORMS",
    "background_last_class_weights",
    "binary_weighted_soft_cross_entropy",
    "regression_distance",
    "teacher_bounded_regression",
    "weighted_soft_cross_entropy",
]
