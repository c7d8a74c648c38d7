"""HGD-like all-stage distillation (docs/methods/hgd.md): the head, stage matching and weights."""

from .head import HGD
from .spatial_weights import spatial_weight_map
from .stage_matching import match_stages
from .stage_weights import StageWeighting

__all__ = ["HGD", "match_stages", "spatial_weight_map", "StageWeighting"]
