"""Activation recompute: a stage forward keeps only its inputs, and its backward runs it again.

``recompute=`` (a training option, or the plan's per stage; the policies are
:mod:`tspipe_fx.schedule.memory`'s, where the planner predicts what they hold):

* ``"never"``: every stage keeps its activations until its backward (the default).
* ``"always"``: every micro-batch of every stage is recomputed.
* ``"except_last"``: all but the batch's last micro-batch, whose backward comes soonest
  (torchgpipe's default).

A recomputed forward runs with autograd saving nothing (:func:`dropped_activations`) and keeps
its inputs; the stage's backward task runs it again, this time keeping its activations, just
before it needs them. The replay draws the same random numbers (its draws are seeded by their
identity, :mod:`.randomness`), runs under the same autocast, and leaves the buffers as they were
(:func:`frozen_buffers`: BatchNorm's running statistics move once). One replay serves both
halves of a split backward. The losses and weights are those without recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tspipe_fx.errors import TspipeError
from tspipe_fx.schedule.memory import RECOMPUTE, checked_recompute, recomputes

__all__ = ["RECOMPUTE", "checked_recompute", "dropped_activations", "frozen_buffers", "recomputes"]


@contextlib.contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Within it, ``module`` computes with copies of its buffers (what it writes into them is
    dropped); afterwards it holds its own again, unchanged. Copies, not a restore: the backward
    may have saved a buffer (BatchNorm's running statistics), and a write back would stale it."""
    swapped = []
    for sub in module.modules():
        for name, b in list(sub._buffers.items()):
            if b is not None:
                swapped.append((sub, name, b))
                sub._buffers[name] = b.clone()
    try:
        yield
    finally:
        for sub, name, b in swapped:
            sub._buffers[name] = b


@contextlib.contextmanager
def dropped_activations() -> Iterator[None]:
    """Within it, autograd saves nothing for the backward: the graph is built (outputs know they
    require grad), but a backward through it is impossible; the replay's graph serves instead."""

    def pack(_: torch.Tensor) -> None:
        return None

    def unpack(_: None) -> torch.Tensor:
        raise TspipeError("a recomputed forward's own activations were used: a runtime bug")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
