"""The training options the pipelined :class:`~tspipe_fx.runtime.trainer.Trainer` and the
:class:`~tspipe_fx.runtime.reference.ReferenceTrainer` share: one type, so both train alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tspipe_fx.errors import TspipeError
from tspipe_fx.runtime.compiled import checked_compile
from tspipe_fx.runtime.optim import OptimizerSpec
from tspipe_fx.runtime.precision import Precision
from tspipe_fx.runtime.teacher import checked_momentum
from tspipe_fx.schedule.memory import checked_recompute

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
    # momentum: batch b's teacher sees the EMA after step b-1-staleness (None: the plan's; reference: 1)
    staleness: int | None = None
    # what one loss call covers: "batch", "micro" or "micro_full_teacher" (None: the plan's; reference: "batch")
    loss: str | None = None
    # teacher micro-batches per student micro-batch (finer teacher tasks fill smaller gaps; None: the
    # plan's, the reference trainer: 1; schedule "auto" only)
    teacher_parts: int | None = None
    momentum: float = 0.996  # EMA momentum of a momentum teacher
    ema_buffers: bool = False  # buffers (BatchNorm statistics) follow the student too
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None  # per optimizer, stepped per batch
    clip_grad_norm: float | None = None  # the global norm over every stage, as clip_grad_norm_ computes it
    # the forwards' autocast: "fp32", "bf16" or "fp16" (with a loss scale); parameters stay fp32
    # (None: the plan's; the reference trainer: "fp32")
    precision: str | None = None
    teacher_precision: str | None = None  # the teacher's forwards (None: as the student's)
    # activation recompute: "never", "always" or "except_last" (the batch's last micro-batch keeps its
    # activations), or one per stage (None: the plan's, "never" unless compile chose); the pipelined
    # trainer's only: the reference trainer's results are the same
    recompute: str | tuple[str, ...] | None = None
    # torch.compile each stage (True or a mode: "reduce-overhead", ...); stages that draw stay eager
    compile_stages: bool | str = False
    # dropout, drop-path...: draw k of micro-batch m's forward is seeded by (seed, model, batch, view, m, k)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> TspipeError:
            return TspipeError(f"{field} must be {rule}, got {getattr(self, field)!r}")

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not (isinstance(self.optimizer, torch.optim.Optimizer) or callable(self.optimizer)):
            raise bad("optimizer", "a torch.optim.Optimizer or a factory params -> optimizer")
        if self.micro_batches is not None and not count(self.micro_batches):
            raise bad("micro_batches", "an integer >= 1")
        if self.teacher_parts is not None and not count(self.teacher_parts):
            raise bad("teacher_parts", "an integer >= 1")
        if self.views not in (None, 1, 2) or isinstance(self.views, bool):
            raise bad("views", "1 or 2")
        if self.staleness not in (None, 0, 1) or isinstance(self.staleness, bool):
            raise bad("staleness", "0 (synchronous) or 1 (TSPipe)")
        if self.loss not in (None, "batch", "micro", "micro_full_teacher"):
            raise bad("loss", "'batch', 'micro' (a mean over samples) or 'micro_full_teacher' (a micro-batch "
                      "of queries against the whole batch's teacher outputs)")  # fmt: skip
        checked_momentum(self.momentum)
        if not isinstance(self.ema_buffers, bool):
            raise bad("ema_buffers", "True or False")
        if self.lr_scheduler is not None and not callable(self.lr_scheduler):
            raise bad("lr_scheduler", "a factory optimizer -> scheduler")
        if self.clip_grad_norm is not None and (
            isinstance(self.clip_grad_norm, bool) or not isinstance(self.clip_grad_norm, (int, float))
            or not self.clip_grad_norm > 0
        ):  # fmt: skip
            raise bad("clip_grad_norm", "a number > 0, or None")
        if self.precision is not None:
            Precision(self.precision)
        for policy in (self.recompute,) if isinstance(self.recompute, str) else self.recompute or ():
            checked_recompute(policy)
        checked_compile(self.compile_stages)
        if self.teacher_precision is not None:
            Precision(self.teacher_precision)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad("seed", "an integer >= 0")

    @classmethod
    def of(cls, optimizer: OptimizerSpec, options: dict[str, Any], *, where: str) -> TrainOptions:
        """``TrainOptions(optimizer=optimizer, **options)``, an unknown option named with the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TspipeError(f"{where} got unknown options {unknown}; known: {sorted(known)}")
        return cls(optimizer=optimizer, **options)
