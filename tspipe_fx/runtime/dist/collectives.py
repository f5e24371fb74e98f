"""Flat buffers for collectives: tensors of one dtype packed into one, and back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["by_dtype", "flatten", "unflatten"]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One buffer for a collective (tensors of one dtype)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(flat, [t.numel() for t in like])
    return [part.view_as(t) for part, t in zip(parts, like, strict=True)]


def by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by dtype (a flat buffer holds one), in a fixed order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return [groups[k] for k in sorted(groups, key=str)]
