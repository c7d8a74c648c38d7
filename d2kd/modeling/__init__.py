from .adapters import FeatureAdapter
from .distiller import DistillationModel
from .feature_pairs import FeaturePairing
from .schedule import DistillSchedule
from .teacher import TeacherRunner, TeacherWeightsError, build_teacher, load_teacher_weights

__all__ = [k for k in globals().keys() if not k.startswith("_")]
