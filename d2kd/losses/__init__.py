"""Loss functions shared by the heads, each a plain formula on tensors."""

from .distribution import kd_kl_div
from .feature import feature_mse

__all__ = ["kd_kl_div", "feature_mse"]
