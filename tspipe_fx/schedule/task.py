"""Tasks and schedules as data: who runs what, on which device, after what.

A task is one unit of work on one device: a teacher forward (``tf``), a student forward
(``sf``) or backward (``sb``) of one micro-batch of one view of one batch on one stage, the loss
(``loss``, on the last device), or the optimizer step of a stage (``opt``, followed by its EMA
update in momentum mode). A schedule that splits the backward (zero-bubble, Qi et al. 2023)
runs ``sb`` as the input-gradient half only and a later ``sw`` for the weight gradients.

The loss granularity (:data:`LOSSES`) says what one ``loss`` task covers:

- ``batch``: the whole batch, every view (one task per batch);
- ``micro``: one micro-batch, every view, with that micro-batch's teacher outputs (a loss that
  is a mean over samples: soft-target KD, BYOL); the terms are weighted by their share of the
  batch so that they add up to the whole-batch loss;
- ``micro_full_teacher``: one micro-batch of student outputs against the teacher outputs of the
  whole batch (InfoNCE of a query micro-batch against every key: a mean over queries).

A :class:`Schedule` is one ordered task list per device; :func:`dependencies` is the task graph
every schedule must respect.

Virtual stages (``stages_per_device`` V > 1, interleaved as in Narayanan et al. 2021): the
models are cut into V·N stages and stage ``j`` runs on device ``j % N``, so device ``d`` holds
stages ``d, d + N, …``. Its loads add up over several pieces of each model, which balances a
chain of coarse nodes better than one contiguous piece per device can. A device's window ``b``
(:func:`window_ends`) ends with the optimizer step of its first stage, ``d``: that stage's
backward comes last in the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from tspipe_fx.errors import TspipeError

__all__ = [
    "LOSSES", "Kind", "Schedule", "ScheduleError", "Task", "dependencies", "dependency_map", "must_precede", "order_key",
    "task_devices", "window_ends", "window_of",
]  # fmt: skip

Kind = Literal["tf", "sf", "sb", "sw", "loss", "opt"]
LOSSES = ("batch", "micro", "micro_full_teacher")


class ScheduleError(TspipeError):
    """A schedule is malformed or would deadlock."""


class Task(NamedTuple):
    """One unit of work of stage ``stage`` (``loss``: the last stage's); the schedule says which
    device runs it (:meth:`Schedule.device_of`).

    A named tuple: schedules of thousands of tasks are hashed and compared at C speed.
    """

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
    loss: str = "batch"  # the loss granularity, one of LOSSES
    split_backward: bool = False  # sb computes input gradients only; sw the weight gradients
    variant: str = ""  # how a synthesized schedule was made (for reports)
    teacher_parts: int = 1  # teacher micro-batches per student micro-batch (each a slice of its rows)
    stages_per_device: int = 1  # virtual stages: stage j runs on device j % n_devices

    def __post_init__(self) -> None:
        v = self.stages_per_device
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or self.n_stages % v:
            raise ScheduleError(
                f"stages_per_device must be an integer >= 1 that divides the {self.n_stages} stages, "
                f"got {v!r}; hint: cut the models into stages_per_device x devices stages"
            )

    @property
    def n_devices(self) -> int:
        return self.n_stages // self.stages_per_device

    def device_of(self, stage: int) -> int:
        """The device that runs stage ``stage``."""
        return stage % self.n_devices

    @property
    def teacher_micro(self) -> int:
        """Teacher micro-batches per batch (and view): ``tf`` tasks count micro-batches in these."""
        return self.micro_batches * self.teacher_parts

    @property
    def loss_per_micro(self) -> bool:
        """One loss task per micro-batch (the student's forwards then run micro-batch-major)."""
        return self.loss != "batch"

    @property
    def micro_major(self) -> bool:
        """Whether micro-batches pass each stage before views (``m0v0 m0v1 m1v0 …``): the order
        a per-micro-batch loss needs. BatchNorm statistics depend on it; the reference trainer
        takes it (``micro_major=``) and the validator holds every device to it."""
        return self.loss_per_micro and self.views > 1 and self.micro_batches > 1

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
        k = s.teacher_parts
        keys = [(v, i) for v in range(s.views) for i in range(s.teacher_micro)]
        if s.loss == "micro":  # the teacher micro-batches that slice this micro-batch
            keys = [(v, i) for v, i in keys if i // k == t.micro]
        deps += [Task("sf", last, t.batch, v, m) for v, m in parts]
        deps += [Task("tf", last, t.batch, v, m) for v, m in keys]
    elif t.kind == "sb":
        deps.append(Task("sf", t.stage, t.batch, t.view, t.micro))
        if t.stage < last:
            deps.append(Task("sb", t.stage + 1, t.batch, t.view, t.micro))
        else:
            deps.append(Task("loss", last, t.batch, 0, t.micro if s.loss_per_micro else 0))
    elif t.kind == "sw":
        deps.append(Task("sb", t.stage, t.batch, t.view, t.micro))
    elif t.kind == "opt":
        last_half: Kind = "sw" if s.split_backward else "sb"
        deps += [Task(last_half, t.stage, t.batch, v, m) for v, m in every]
    return deps


def dependency_map(s: Schedule) -> Mapping[Task, Sequence[Task]]:
    """:func:`dependencies` of every task the schedule must contain, computed once per kind of
    schedule (its lists aside): the simulator and the synthesizer ask for thousands of lists
    over the same tasks. Read-only."""
    return _dependency_map(dataclasses.replace(s, name="", devices=(), variant=""))


@functools.lru_cache(maxsize=32)
def _dependency_map(skeleton: Schedule) -> Mapping[Task, Sequence[Task]]:
    return types.MappingProxyType({t: tuple(dependencies(skeleton, t)) for t in task_devices(skeleton)})


def must_precede(s: Schedule, t: Task) -> list[Task]:
    """Tasks ``t`` must run before on its own device: a stale teacher reads the old weights."""
    if t.kind == "tf" and s.mode == "momentum":
        newer = t.batch - s.staleness  # the step whose EMA this forward must not yet see
        if 0 <= newer < s.n_batches and newer < t.batch:
            return [Task("opt", t.stage, newer)]
    return []


def order_key(s: Schedule, t: Task) -> tuple[int, int]:
    """Where a forward comes in its stage's order of one batch (views first, or micro-batches)."""
    return (t.micro, t.view) if s.micro_major else (t.view, t.micro)


def window_of(s: Schedule, t: Task) -> int:
    """The window a task runs in: window ``b`` ends with the optimizer step of batch ``b``; a
    teacher forward that may read the weights before step ``b`` (KD, or a one-step-late momentum
    teacher) runs in the window before its batch's, filling the gaps of batch ``b``'s student."""
    if t.kind == "tf" and (s.mode == "kd" or s.staleness >= 1):
        return max(0, t.batch - 1)
    return t.batch


def window_ends(tasks: Sequence[Task]) -> list[int]:
    """Where each window of one device's task list ends: the positions of the optimizer steps
    of the device's first stage (its only one without virtual stages)."""
    first = min((t.stage for t in tasks if t.kind == "opt"), default=0)
    return [i for i, t in enumerate(tasks) if t.kind == "opt" and t.stage == first]


def task_devices(s: Schedule) -> dict[Task, int]:
    """Every task the schedule must contain, with its device."""
    kinds: tuple[Kind, ...] = ("sf", "sb", "sw") if s.split_backward else ("sf", "sb")
    out: dict[Task, int] = {}
    for b in range(s.n_batches):
        for j in range(s.n_stages):
            d = s.device_of(j)
            for v in range(s.views):
                for i in range(s.teacher_micro):
                    out[Task("tf", j, b, v, i)] = d
                for i in range(s.micro_batches):
                    for kind in kinds:
                        out[Task(kind, j, b, v, i)] = d
            out[Task("opt", j, b)] = d
        for i in range(s.micro_batches if s.loss_per_micro else 1):
            out[Task("loss", s.n_stages - 1, b, 0, i)] = s.device_of(s.n_stages - 1)
    return out
