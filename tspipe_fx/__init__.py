"""tspipe_fx: a torch.fx pipeline compiler and runtime for teacher-student training."""

from tspipe_fx.capture import CapturedModel, capture
from tspipe_fx.compiler import Pipeline, compile
from tspipe_fx.errors import CaptureError, ProfileError, TspipeError
from tspipe_fx.partition import PartitionError
from tspipe_fx.plan import Plan
from tspipe_fx.profiling import Profile, profile

__all__ = [
    "CaptureError",
    "CapturedModel",
    "PartitionError",
    "Pipeline",
    "Plan",
    "Profile",
    "ProfileError",
    "TspipeError",
    "capture",
    "compile",
    "profile",
]
