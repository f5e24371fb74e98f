"""tspipe_fx: a torch.fx pipeline compiler and runtime for teacher-student training.

Public names load lazily (PEP 562): ``import tspipe_fx.schedule`` loads the schedules alone, and
``tspipe_fx.compile`` loads the compiler on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tspipe_fx.api import compile
    from tspipe_fx.cost.profile import Profile
    from tspipe_fx.cost.profiling import profile
    from tspipe_fx.errors import CaptureError, ProfileError, TspipeError
    from tspipe_fx.partition.problem import PartitionError
    from tspipe_fx.pipeline import Pipeline
    from tspipe_fx.plan import Plan
    from tspipe_fx.runtime.reference import ReferenceTrainer
    from tspipe_fx.runtime.trainer import Trainer
    from tspipe_fx.tracing import CapturedModel, capture

_HOMES = {
    "CaptureError": "tspipe_fx.errors",
    "CapturedModel": "tspipe_fx.tracing",
    "PartitionError": "tspipe_fx.partition.problem",
    "Pipeline": "tspipe_fx.pipeline",
    "Plan": "tspipe_fx.plan",
    "Profile": "tspipe_fx.cost.profile",
    "ProfileError": "tspipe_fx.errors",
    "ReferenceTrainer": "tspipe_fx.runtime.reference",
    "Trainer": "tspipe_fx.runtime.trainer",
    "TspipeError": "tspipe_fx.errors",
    "capture": "tspipe_fx.tracing",
    "compile": "tspipe_fx.api",
    "profile": "tspipe_fx.cost.profiling",
}

__all__ = [
    "CaptureError",
    "CapturedModel",
    "PartitionError",
    "Pipeline",
    "Plan",
    "Profile",
    "ProfileError",
    "ReferenceTrainer",
    "Trainer",
    "TspipeError",
    "capture",
    "compile",
    "profile",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tspipe_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
