"""Global Knowledge distillation (docs/methods/gkd.md): the head, its prototypes and their hook."""

from .head import GKD, decoupled_feature_loss, global_knowledge_loss, response_loss

__all__ = ["GKD", "decoupled_feature_loss", "global_knowledge_loss", "response_loss"]
