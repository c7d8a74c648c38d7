"""Loss functions shared by the heads, each a plain formula on tensors."""

from .distribution import kd_kl_div
from .feature import feature_mse
from .weighted_soft_ce import (
    background_last_class_weights,
    binary_weighted_soft_cross_entropy,
    weighted_soft_cross_entropy,
)
from .bounded_regression import regression_distance, teacher_bounded_regression

__all__ = ["kd_kl_div", "feature_mse"]
__all__ += ["background_last_class_weights", "binary_weighted_soft_cross_entropy", "weighted_soft_cross_entropy"]
__all__ += ["regression_distance", "teacher_bounded_regression"]
from .focal_global import fgd_attention_loss, fgd_feature_loss, fgd_global_loss

__all__ += ["fgd_attention_loss", "fgd_feature_loss", "fgd_global_loss"]
from .sigmoid_kd import binary_kd_div

__all__ += ["binary_kd_div"]
