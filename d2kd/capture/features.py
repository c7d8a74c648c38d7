"""
Where a named feature map comes from in a Detectron2 model.

FPN outputs (``p2..p7``) are the output dict of ``backbone``; backbone stages
(``res2..res5``) are the output dict of ``backbone.bottom_up`` (for a non-FPN backbone they
are ``backbone``'s own outputs). Heads name features; this module maps them to capture
targets and shapes.
"""

from typing import Dict, Sequence

from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["feature_source", "feature_shapes", "available_features", "FeatureNotFoundError"]


class FeatureNotFoundError(KeyError):
    def __str__(self):
        return str(self.args[0])


def _available(model: nn.Module) -> Dict[str, Dict[str, ShapeSpec]]:
    backbone = model.backbone
    sources = {"backbone": backbone.output_shape()}
    bottom_up = getattr(backbone, "bottom_up", None)
    if bottom_up is not None and hasattr(bottom_up, "output_shape"):
        sources["backbone.bottom_up"] = bottom_up.output_shape()
    return sources


def feature_source(model: nn.Module, name: str, role: str = "model") -> str:
    """The module path whose output dict holds feature ``name``."""
    sources = _available(model)
    for path, shapes in sources.items():
        if name in shapes:
            return path
    listed = {path: sorted(shapes) for path, shapes in sources.items()}
    raise FeatureNotFoundError(
        f"The {role} has no feature named '{name}'. Available features by module: {listed}. "
        "Use one of them in the head's IN_FEATURES (or add it to the backbone's OUT_FEATURES)."
    )


def feature_shapes(model: nn.Module, names: Sequence[str], role: str = "model") -> Dict[str, ShapeSpec]:
    """Channels and stride of each named feature, as the model reports them."""
    sources = _available(model)
    return {name: sources[feature_source(model, name, role)][name] for name in names}


def available_features(model: nn.Module) -> Dict[str, ShapeSpec]:
    """Every feature the model reports (backbone stages and FPN levels), name -> shape."""
    out: Dict[str, ShapeSpec] = {}
    for shapes in _available(model).values():
        for name, shape in shapes.items():
            out.setdefault(name, shape)
    return out
