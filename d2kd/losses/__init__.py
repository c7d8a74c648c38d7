"""
Loss functions shared by two or more heads, each a plain formula on tensors. A method's own
losses live with its head (e.g. ``d2kd.heads.chen2017.weighted_soft_ce``,
``d2kd.heads.fgd.focal_global``).
"""

from .distribution import kd_kl_div
from .feature import feature_mse
from .imitation import weighted_imitation_loss, weighted_imitation_losses
from .sigmoid_kd import binary_kd_div

__all__ = ["kd_kl_div", "feature_mse", "binary_kd_div", "weighted_imitation_loss", "weighted_imitation_losses"]
