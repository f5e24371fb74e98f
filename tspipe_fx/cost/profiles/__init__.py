"""Profiles shipped with tspipe_fx: real models measured on real hardware, as JSON.

Named ``DEVICE/MODEL_bBATCH`` (``"cpu/resnet50_b8"``); ``benchmarks/profile/run.py --save``
writes the CPU ones and ``benchmarks/gpu/`` the GPU ones.

Example:
    >>> from tspipe_fx.cost import profiles
    >>> profiles.available()
    ['cpu/bert_base_b8', 'cpu/resnet50_b8', 'cpu/vit_b16_b8']
    >>> prof = profiles.load("cpu/resnet50_b8")
"""

from __future__ import annotations

from pathlib import Path

from tspipe_fx.cost.profile import Profile
from tspipe_fx.errors import ProfileError

__all__ = ["available", "load", "path_of"]

ROOT = Path(__file__).parent


def available() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(str(p.relative_to(ROOT).with_suffix("")) for p in ROOT.glob("*/*.json"))


def path_of(name: str) -> Path:
    """Where the profile ``name`` lives (it need not exist yet)."""
    return ROOT / f"{name}.json"


def load(name: str) -> Profile:
    """Load a shipped profile by name."""
    path = path_of(name)
    if not path.is_file():
        raise ProfileError(f"no shipped profile {name!r}; available: {available()}")
    return Profile.load(path)
