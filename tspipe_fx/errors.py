"""The exceptions tspipe_fx raises: each says the rule, the offending values and a hint."""

from __future__ import annotations

__all__ = ["CaptureError", "ProfileError", "TspipeError"]


class TspipeError(ValueError):
    """Base class of every error tspipe_fx raises on bad input."""


class CaptureError(TspipeError):
    """A model could not be captured as a flat ``fx.GraphModule``, or is called unlike its capture."""


class ProfileError(TspipeError):
    """A profile could not be made, read, or matched to a graph."""
