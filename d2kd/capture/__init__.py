from .features import FeatureNotFoundError, feature_shapes, feature_source
from .recorder import CaptureTargetError, Recorder, Records, resolve_module

__all__ = [k for k in globals().keys() if not k.startswith("_")]
