"""Tasks and schedules as data: who runs what, on which device, after what.

A task is one unit of work on one device: a teacher forward (``tf``), a student forward
(``sf``) or backward (``sb``) of one micro-batch of one view of one batch on one stage, the loss
of a batch (``loss``, on the last device, over the whole batch), or the optimizer step of a
stage (``opt``, followed by its EMA update in momentum mode). A :class:`Schedule` is one ordered
task list per device; :func:`dependencies` is the task graph every schedule must respect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from tspipe_fx.errors import TspipeError

__all__ = ["Kind", "Schedule", "ScheduleError", "Task", "dependencies", "must_precede"]

Kind = Literal["tf", "sf", "sb", "loss", "opt"]


class ScheduleError(TspipeError):
    """A schedule is malformed or would deadlock."""


@dataclass(frozen=True, order=True)
class Task:
    """One unit of work; ``stage`` is also the device it runs on (``loss``: the last one)."""

    kind: Kind
    stage: int
    batch: int
    view: int = 0
    micro: int = 0

    def with_batch(self, batch: int) -> Task:
        """The same task for another batch (windows are cut from short schedules and renumbered)."""
        return Task(self.kind, self.stage, batch, self.view, self.micro)

    def __str__(self) -> str:
        if self.kind in ("loss", "opt"):
            return f"{self.kind}{self.batch}"
        return f"{self.kind}{self.batch}.{self.view}.{self.micro}"


@dataclass(frozen=True)
class Schedule:
    """Per-device task lists for ``n_batches`` batches."""

    name: str
    n_stages: int
    micro_batches: int
    views: int
    mode: str  # "kd" or "momentum"
    staleness: int  # momentum: batch b's teacher forward sees the EMA after step b-1-staleness
    n_batches: int
    devices: tuple[tuple[Task, ...], ...]
    loss_per_micro: bool = False  # 1f1b: one loss per micro-batch (needs a loss that is a mean over samples)

    def tasks(self) -> Iterator[tuple[int, Task]]:
        for d, tasks in enumerate(self.devices):
            for t in tasks:
                yield d, t


def dependencies(s: Schedule, t: Task) -> list[Task]:
    """Tasks that must finish before ``t`` starts (data and weight-version dependencies)."""
    last = s.n_stages - 1
    every = [(v, m) for v in range(s.views) for m in range(s.micro_batches)]
    deps: list[Task] = []
    if t.kind == "sf":
        if t.stage > 0:
            deps.append(Task("sf", t.stage - 1, t.batch, t.view, t.micro))
        if t.batch > 0:  # the student is synchronous: batch b uses the weights after step b-1
            deps.append(Task("opt", t.stage, t.batch - 1))
    elif t.kind == "tf":
        if t.stage > 0:
            deps.append(Task("tf", t.stage - 1, t.batch, t.view, t.micro))
        version = t.batch - 1 - s.staleness
        if s.mode == "momentum" and version >= 0:
            deps.append(Task("opt", t.stage, version))
    elif t.kind == "loss":
        parts = [(v, m) for v, m in every if not s.loss_per_micro or m == t.micro]
        deps += [Task("sf", last, t.batch, v, m) for v, m in parts]
        deps += [Task("tf", last, t.batch, v, m) for v, m in parts]
    elif t.kind == "sb":
        deps.append(Task("sf", t.stage, t.batch, t.view, t.micro))
        if t.stage < last:
            deps.append(Task("sb", t.stage + 1, t.batch, t.view, t.micro))
        else:
            deps.append(Task("loss", last, t.batch, 0, t.micro if s.loss_per_micro else 0))
    elif t.kind == "opt":
        deps += [Task("sb", t.stage, t.batch, v, m) for v, m in every]
    return deps


def must_precede(s: Schedule, t: Task) -> list[Task]:
    """Tasks ``t`` must run before on its own device: a stale teacher reads the old weights."""
    if t.kind == "tf" and s.mode == "momentum":
        newer = t.batch - s.staleness  # the step whose EMA this forward must not yet see
        if 0 <= newer < s.n_batches and newer < t.batch:
            return [Task("opt", t.stage, newer)]
    return []
