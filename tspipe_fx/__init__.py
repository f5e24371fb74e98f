"""tspipe_fx: a torch.fx pipeline compiler and runtime for teacher-student training."""

from tspipe_fx.capture import CapturedModel, capture
from tspipe_fx.errors import CaptureError, ProfileError, TspipeError
from tspipe_fx.profiling import Profile, profile

__all__ = ["CaptureError", "CapturedModel", "Profile", "ProfileError", "TspipeError", "capture", "profile"]
