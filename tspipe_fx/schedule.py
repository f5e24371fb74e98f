"""Pipeline schedules as data: per-device ordered task lists, their dependencies and a validator.

A task is one unit of work on one device: a teacher forward (``tf``), a student forward
(``sf``) or backward (``sb``) of one micro-batch of one view of one batch on one stage, the loss
of a batch (``loss``, on the last device, over the whole batch), or the optimizer step of a
stage (``opt``, followed by its EMA update in momentum mode). Devices run their lists in order
and block until a task's inputs are there; the simulator, the validator, the reports and both
runtimes read the same lists.

The ``tspipe`` schedule, one device ``j`` of ``N``, batch ``b`` (TSPipe, Lim et al. 2022)::

    sf(b, all views, all micro-batches)
    tf(b+1, first T*(N-1-j)/(N-1) teacher micro-batches)   # fills the wait for the gradients
    loss(b)                                                 # last device only
    sb(b, all, in reverse)
    tf(b+1, the rest)                                       # fills the wait for the next batch
    opt(b)                                                  # then the EMA update (momentum)

With two views, ``M = N - 1`` micro-batches and unit costs (forward 1, backward 2, optimizer 1)
the steady state has no idle slot: ``8(N-1) + 1`` slots per batch. In momentum mode the teacher
forward of ``b+1`` then runs before ``opt(b)``: the teacher is one step late (``staleness=1``, as
in TSPipe); ``staleness=0`` moves it after ``opt(b)``, exactly synchronous.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from tspipe_fx.errors import TspipeError

__all__ = ["SCHEDULES", "Schedule", "ScheduleError", "Task", "dependencies", "make_schedule", "validate"]

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


# --- dependencies ----------------------------------------------------------------------------


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


def _must_precede(s: Schedule, t: Task) -> list[Task]:
    """Tasks ``t`` must run before on its own device: a stale teacher reads the old weights."""
    if t.kind == "tf" and s.mode == "momentum":
        newer = t.batch - s.staleness  # the step whose EMA this forward must not yet see
        if 0 <= newer < s.n_batches and newer < t.batch:
            return [Task("opt", t.stage, newer)]
    return []


# --- generators ------------------------------------------------------------------------------


def _sf(j: int, b: int, views: int, m: int) -> list[Task]:
    return [Task("sf", j, b, v, i) for v in range(views) for i in range(m)]


def _sb(j: int, b: int, views: int, m: int) -> list[Task]:
    return [Task("sb", j, b, v, i) for v in reversed(range(views)) for i in reversed(range(m))]


def _tf(j: int, b: int, views: int, m: int) -> list[Task]:
    return [Task("tf", j, b, v, i) for v in range(views) for i in range(m)]


def _tspipe(n: int, m: int, views: int, mode: str, staleness: int, batches: int) -> list[list[Task]]:
    devices: list[list[Task]] = [[] for _ in range(n)]
    hoist = mode == "kd" or staleness >= 1
    for j in range(n):
        out = devices[j]
        out += _tf(j, 0, views, m)  # the prologue: batch 0's teacher forward
        for b in range(batches):
            nxt = _tf(j, b + 1, views, m) if b + 1 < batches else []
            # Device j waits about 2(N-1-j) slots for its gradients and 2j for the next batch.
            before = (
                round(len(nxt) * (n - 1 - j) / (n - 1)) if n > 1 and hoist else (len(nxt) if hoist else 0)
            )
            out += _sf(j, b, views, m)
            out += nxt[:before]
            if j == n - 1:
                out.append(Task("loss", j, b))
            out += _sb(j, b, views, m)
            if hoist:
                out += nxt[before:]
                out.append(Task("opt", j, b))
            else:  # synchronous teacher: its forward of b+1 needs the EMA of step b
                out.append(Task("opt", j, b))
                out += nxt
    return devices


def _teacher_slots(
    j: int, b: int, views: int, m: int, mode: str, staleness: int, batches: int
) -> tuple[list[Task], list[Task]]:
    """Teacher forwards a flushing schedule runs at the start of batch ``b`` and just before its
    optimizer step: a one-step-late momentum teacher must read the weights before ``opt(b)``
    changes them, so its forward of ``b+1`` goes there; otherwise batch ``b``'s own goes first."""
    if mode == "momentum" and staleness == 1:
        first = _tf(j, 0, views, m) if b == 0 else []
        return first, (_tf(j, b + 1, views, m) if b + 1 < batches else [])
    return _tf(j, b, views, m), []


def _gpipe(n: int, m: int, views: int, mode: str, staleness: int, batches: int) -> list[list[Task]]:
    """Teacher pipeline, then student pipeline with a flush, per batch (as a GPipe user would)."""
    devices: list[list[Task]] = [[] for _ in range(n)]
    for j in range(n):
        for b in range(batches):
            first, last = _teacher_slots(j, b, views, m, mode, staleness, batches)
            devices[j] += first + _sf(j, b, views, m)
            if j == n - 1:
                devices[j].append(Task("loss", j, b))
            devices[j] += _sb(j, b, views, m) + last + [Task("opt", j, b)]
    return devices


def _micro_major(t: Task) -> tuple[int, int]:
    return (t.micro, t.view)


def _1f1b(n: int, m: int, views: int, mode: str, staleness: int, batches: int) -> list[list[Task]]:
    """One forward, one backward (PipeDream-flush / Megatron): stage ``j`` runs ``N - j`` warm-up
    forwards, then alternates. Backward of a micro-batch starts as soon as its own loss is
    known, so this schedule takes one loss per micro-batch (a mean over samples decomposes;
    InfoNCE over the whole batch does not: use ``tspipe`` or ``gpipe`` for that)."""
    devices: list[list[Task]] = [[] for _ in range(n)]
    for j in range(n):
        for b in range(batches):
            micro = [[Task("sf", j, b, v, i) for v in range(views)] for i in range(m)]
            first, last = _teacher_slots(j, b, views, m, mode, staleness, batches)
            # Micro-batch-major, like the student's forwards (BatchNorm sees one order per model).
            first, last = sorted(first, key=_micro_major), sorted(last, key=_micro_major)
            seq = devices[j]
            seq += first
            warm = min(m, n - j)
            pending = list(range(m))
            done_f = 0
            for _ in range(warm):
                seq += micro[done_f]
                done_f += 1
            while pending:
                i = pending.pop(0)
                if j == n - 1:
                    seq.append(Task("loss", j, b, 0, i))
                seq += [Task("sb", j, b, v, i) for v in range(views)]
                if done_f < m:
                    seq += micro[done_f]
                    done_f += 1
            seq += [*last, Task("opt", j, b)]
    return devices


def _sequential(n: int, m: int, views: int, mode: str, staleness: int, batches: int) -> list[list[Task]]:
    """Inter-layer model parallelism without micro-batching (the paper's baseline)."""
    return _gpipe(n, 1, views, mode, staleness, batches)


SCHEDULES = {"tspipe": _tspipe, "gpipe": _gpipe, "1f1b": _1f1b, "sequential": _sequential}


def make_schedule(
    name: str,
    n_stages: int,
    micro_batches: int,
    *,
    views: int = 1,
    mode: str = "kd",
    staleness: int = 1,
    n_batches: int = 4,
) -> Schedule:
    """Build a schedule by name: ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential``.

    Example:
        >>> s = make_schedule("tspipe", 4, 3, views=2, mode="momentum")
        >>> [str(t) for t in s.devices[3][:3]]
        ['tf0.0.0', 'tf0.0.1', 'tf0.0.2']
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    for what, value, low in (
        ("n_stages", n_stages, 1),
        ("micro_batches", micro_batches, 1),
        ("views", views, 1),
        ("n_batches", n_batches, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ScheduleError(f"{what} must be an integer >= {low}, got {value!r}")
    if views > 2:
        raise ScheduleError(f"views must be 1 or 2, got {views}")
    if mode not in ("kd", "momentum"):
        raise ScheduleError(f"mode must be 'kd' or 'momentum', got {mode!r}")
    if staleness not in (0, 1):
        raise ScheduleError(f"staleness must be 0 (synchronous) or 1 (TSPipe), got {staleness!r}")
    m = 1 if name == "sequential" else micro_batches
    lists = SCHEDULES[name](n_stages, m, views, mode, staleness, n_batches)
    return Schedule(
        name, n_stages, m, views, mode, staleness if mode == "momentum" else 0, n_batches,
        tuple(tuple(d) for d in lists), loss_per_micro=name == "1f1b",
    )  # fmt: skip


# --- validation ------------------------------------------------------------------------------


def _expected(s: Schedule) -> dict[Task, int]:
    """Every task the schedule must contain, with its device."""
    out: dict[Task, int] = {}
    for b in range(s.n_batches):
        for j in range(s.n_stages):
            for v in range(s.views):
                for i in range(s.micro_batches):
                    for kind in ("tf", "sf", "sb"):
                        out[Task(kind, j, b, v, i)] = j
            out[Task("opt", j, b)] = j
        for i in range(s.micro_batches if s.loss_per_micro else 1):
            out[Task("loss", s.n_stages - 1, b, 0, i)] = s.n_stages - 1
    return out


def validate(s: Schedule, *, max_in_flight: int | None = None) -> dict[str, int]:
    """Prove ``s``: every task once on its device, dependencies satisfiable without deadlock,
    stale-teacher orderings kept, activations in flight bounded.

    Returns ``{"max_in_flight": ...}`` (student micro-batches forwarded but not yet backwarded
    on one device, at most). Raises :class:`ScheduleError` naming the first violation.
    """
    expected = _expected(s)
    seen: dict[Task, int] = {}
    for d, t in s.tasks():
        if t in seen:
            raise ScheduleError(f"{s.name}: task {t} appears twice (devices {seen[t]} and {d})")
        if t not in expected:
            raise ScheduleError(f"{s.name}: unexpected task {t} on device {d}")
        if expected[t] != d:
            raise ScheduleError(f"{s.name}: task {t} is on device {d}, it belongs on device {expected[t]}")
        seen[t] = d
    missing = [str(t) for t in expected if t not in seen]
    if missing:
        raise ScheduleError(f"{s.name}: {len(missing)} tasks missing, e.g. {missing[:5]}")
    position = {t: (d, i) for d, tasks in enumerate(s.devices) for i, t in enumerate(tasks)}
    for d, tasks in enumerate(s.devices):
        for i, t in enumerate(tasks):
            for dep in dependencies(s, t):
                dd, di = position[dep]
                if dd == d and di > i:
                    raise ScheduleError(f"{s.name}: device {d} runs {t} before {dep}, which it needs")
            for later in _must_precede(s, t):
                if position[later][1] < i:
                    raise ScheduleError(
                        f"{s.name}: device {d} runs {later} before {t}, so the teacher would see weights "
                        f"newer than staleness {s.staleness} allows"
                    )
    _check_deadlock(s, position)
    return {"max_in_flight": _in_flight(s, max_in_flight)}


def _check_deadlock(s: Schedule, position: dict[Task, tuple[int, int]]) -> None:
    """Run the lists with blocking receives and zero costs; every task must complete."""
    done: set[Task] = set()
    heads = [0] * len(s.devices)
    progress = True
    while progress:
        progress = False
        for d, tasks in enumerate(s.devices):
            while heads[d] < len(tasks) and all(dep in done for dep in dependencies(s, tasks[heads[d]])):
                done.add(tasks[heads[d]])
                heads[d] += 1
                progress = True
    stuck = [(d, s.devices[d][h]) for d, h in enumerate(heads) if h < len(s.devices[d])]
    if stuck:
        waits = "; ".join(
            f"device {d} at {t} waits for {[str(x) for x in dependencies(s, t) if x not in done][:3]}"
            for d, t in stuck
        )
        raise ScheduleError(f"{s.name}: deadlock: {waits}")


def _in_flight(s: Schedule, bound: int | None) -> int:
    worst = 0
    for d, tasks in enumerate(s.devices):
        live = 0
        for t in tasks:
            if t.kind == "sf":
                live += 1
                worst = max(worst, live)
                if bound is not None and live > bound:
                    raise ScheduleError(
                        f"{s.name}: device {d} holds {live} micro-batches' activations at {t}, more than {bound}"
                    )
            elif t.kind == "sb":
                live -= 1
    return worst
