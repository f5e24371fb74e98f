"""Schedule generators: ``tspipe``, ``gpipe``, ``1f1b`` and ``sequential`` task lists per device.

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

from tspipe_fx.schedule.task import Schedule, ScheduleError, Task

__all__ = ["SCHEDULES", "make_schedule"]


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
