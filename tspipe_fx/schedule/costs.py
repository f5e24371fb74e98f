"""What a schedule's tasks cost: per stage, one micro-batch, in milliseconds.

The simulator, the synthesizer and the plan price tasks with one :class:`StageCosts`: stage
``j``'s student forward and backward and teacher forward (on the schedule's device of stage
``j``); an activation (or its gradient, as large) crosses the link from stage ``j``'s device to
stage ``j + 1``'s in ``student_send_ms[j]`` (``teacher_send_ms[j]``).
Optimizer steps and the loss take no time.

A split backward (zero-bubble) prices its halves with ``weight_grad_share``: of a layer with
weights, the backward computes the input gradient and the weight gradient at about the same
cost each (two matrix products of the forward's size), so ``sb`` takes ``1 - share`` of the
stage's backward and ``sw`` the rest. Stage 0's inputs are the model's inputs, which need no
gradient: its ``sb`` is free and its ``sw`` is the whole backward. Where the halves were timed
(``split_shares``, from compile's ``refine``) they are priced as timed: on a CPU the two halves
of a ResNet stage took ~1.2x its whole backward, which the share rule does not see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from tspipe_fx.schedule.task import ScheduleError, Task

__all__ = ["StageCosts", "at_least_whole", "transfer_ms"]


def at_least_whole(inputs: float, weights: float) -> tuple[float, float]:
    """A split backward's timed (input, weight) halves, as shares of the whole backward, raised in
    proportion to add up to at least 1: the same gradients in two calls cannot cost less than in
    one, so halves timed below the whole are timing noise (a period priced on them comes out
    shorter than the busiest device's compute). Halves above it are kept: what splitting costs.
    No time at all: the whole backward is the weight half's."""
    total = inputs + weights
    if not total > 0:
        return 0.0, 1.0
    k = max(1.0, total) / total
    return inputs * k, weights * k


def transfer_ms(nbytes: float, gbs: float, latency_ms: float) -> float:
    """Milliseconds to send ``nbytes`` over a link of ``gbs`` GB/s and ``latency_ms`` per message
    (nothing to send over a link without latency is free). The partitioner's objective and the
    simulator both price a transfer with this rule."""
    if nbytes <= 0 and latency_ms == 0:
        return 0.0
    return nbytes / (gbs * 1e6) + latency_ms


def _floats(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class StageCosts:
    """Task times per stage (see the module docstring).

    Example:
        >>> c = StageCosts.of([1, 1], [2, 2], [1, 1])
        >>> c.task_ms(Task("sb", 1, 0))
        2.0
    """

    student_fwd_ms: tuple[float, ...]
    student_bwd_ms: tuple[float, ...]
    teacher_fwd_ms: tuple[float, ...]
    student_send_ms: tuple[float, ...] = field(default=())
    teacher_send_ms: tuple[float, ...] = field(default=())
    weight_grad_share: float = 0.5
    split_backward: bool = False  # price sb as the input-gradient half
    teacher_parts: int = 1  # a teacher forward is this share of a student micro-batch (linear)
    # per stage, a split backward's halves (input, weight) as shares of its backward, as timed;
    # their sum above 1 is what splitting costs (empty: weight_grad_share, at no cost)
    split_shares: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.student_fwd_ms)
        for name in ("student_bwd_ms", "teacher_fwd_ms", "student_send_ms", "teacher_send_ms"):
            values = getattr(self, name)
            if name.endswith("send_ms") and not values:
                object.__setattr__(self, name, (0.0,) * n)
            elif len(values) != n:
                raise ScheduleError(f"StageCosts.{name} has {len(values)} stages, student_fwd_ms {n}")
        every = (*self.student_fwd_ms, *self.student_bwd_ms, *self.teacher_fwd_ms,
                 *self.student_send_ms, *self.teacher_send_ms)  # fmt: skip
        if any(not v >= 0 for v in every):
            raise ScheduleError(
                f"task times must be numbers >= 0, got {[v for v in every if not v >= 0][:3]}"
            )
        if self.split_shares and (
            len(self.split_shares) != n or any(len(h) != 2 or not min(h) >= 0 for h in self.split_shares)
        ):
            raise ScheduleError(
                f"StageCosts.split_shares needs a pair of shares >= 0 for each of {n} stages, got "
                f"{self.split_shares!r}"
            )
        if not 0 <= self.weight_grad_share <= 1:
            raise ScheduleError(f"weight_grad_share must be in [0, 1], got {self.weight_grad_share}")

    @classmethod
    def of(
        cls,
        student_fwd_ms: Sequence[float],
        student_bwd_ms: Sequence[float],
        teacher_fwd_ms: Sequence[float],
        student_send_ms: Sequence[float] = (),
        teacher_send_ms: Sequence[float] = (),
    ) -> StageCosts:
        return cls(_floats(student_fwd_ms), _floats(student_bwd_ms), _floats(teacher_fwd_ms),
                   _floats(student_send_ms), _floats(teacher_send_ms))  # fmt: skip

    @classmethod
    def unit(cls, n_stages: int) -> StageCosts:
        """TSPipe's unit model: forward 1, backward 2."""
        return cls.of([1.0] * n_stages, [2.0] * n_stages, [1.0] * n_stages)

    @property
    def n_stages(self) -> int:
        return len(self.student_fwd_ms)

    def for_schedule(self, split_backward: bool, teacher_parts: int) -> StageCosts:
        """Priced as a schedule runs: its backward split or not, its teacher micro-batches."""
        if (split_backward, teacher_parts) == (self.split_backward, self.teacher_parts):
            return self
        return dataclasses.replace(self, split_backward=split_backward, teacher_parts=teacher_parts)

    def task_ms(self, t: Task) -> float:
        j = t.stage
        if t.kind == "sf":
            return self.student_fwd_ms[j]
        if t.kind == "tf":
            return self.teacher_fwd_ms[j] / self.teacher_parts
        if t.kind in ("sb", "sw"):
            whole = self.student_bwd_ms[j]
            if not self.split_backward:
                return whole if t.kind == "sb" else 0.0
            if self.split_shares:
                inputs, weights = self.split_shares[j]
                return whole * (weights if t.kind == "sw" else inputs)
            weights = whole if j == 0 else whole * self.weight_grad_share
            return weights if t.kind == "sw" else whole - weights
        return 0.0

    def link_ms(self, dep: Task, t: Task) -> float:
        """The transfer before ``t`` when ``dep`` ran on another device."""
        if dep.kind == "sf":
            return self.student_send_ms[dep.stage]
        if dep.kind == "sb":
            return self.student_send_ms[t.stage]
        return self.teacher_send_ms[dep.stage] / self.teacher_parts if dep.kind == "tf" else 0.0

    def work_ms(self, micro_batches: int, views: int) -> float:
        """Every device's work of one batch, summed (the physical limit is this over devices)."""
        per_micro = sum(self.student_fwd_ms) + sum(self.student_bwd_ms) + sum(self.teacher_fwd_ms)
        return per_micro * micro_batches * views

    def loads_ms(self, micro_batches: int, views: int, stages_per_device: int = 1) -> list[float]:
        """Each device's work of one batch (stage ``j`` on device ``j % devices``)."""
        stages = [(f + b + t) * micro_batches * views for f, b, t in
                  zip(self.student_fwd_ms, self.student_bwd_ms, self.teacher_fwd_ms, strict=True)]  # fmt: skip
        n = len(stages) // stages_per_device
        return [sum(stages[d::n]) for d in range(n)]
