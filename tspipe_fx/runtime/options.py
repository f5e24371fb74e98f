"""The training options the pipelined :class:`~tspipe_fx.runtime.trainer.Trainer` and the
:class:`~tspipe_fx.runtime.reference.ReferenceTrainer` share: one type, so both train alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.optim import OptimizerSpec

__all__ = ["TrainOptions"]


@dataclass(frozen=True)
class TrainOptions:
    """How to train, whatever runs it.

    Example:
        >>> TrainOptions(optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), momentum=0.99)
    """

    optimizer: OptimizerSpec  # a factory params -> optimizer, or an instance over the student's parameters
    micro_batches: int | None = None  # per batch (None: the plan's; the reference trainer: 1)
    views: int | None = None  # inputs per sample, 1 or 2 (None: the plan's; the reference trainer: 1)
    staleness: int = 1  # momentum: batch b's teacher sees the EMA after step b-1-staleness (1: TSPipe)
    momentum: float = 0.996  # EMA momentum of a momentum teacher
    ema_buffers: bool = False  # buffers (BatchNorm statistics) follow the student too
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = (
        None  # built per optimizer, stepped per batch
    )
    clip_grad_norm: float | None = None  # the global norm over every stage, as clip_grad_norm_ computes it

    @classmethod
    def of(cls, optimizer: OptimizerSpec, options: dict[str, Any], *, where: str) -> TrainOptions:
        """``TrainOptions(optimizer=optimizer, **options)``, an unknown option named with the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TspipeError(f"{where} got unknown options {unknown}; known: {sorted(known)}")
        return cls(optimizer=optimizer, **options)
