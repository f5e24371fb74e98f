"""Schedule generators: ``auto`` (synthesized for the costs), ``tspipe``, ``gpipe``, ``1f1b`` and
``sequential`` task lists per device.

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

import dataclasses
import functools

from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.periodic import HORIZON, Templates, periodic
from tspipe_fx.schedule.repair import repair
from tspipe_fx.schedule.synthesis import templates
from tspipe_fx.schedule.task import LOSSES, Schedule, ScheduleError, Task
from tspipe_fx.schedule.validator import validate

__all__ = ["SCHEDULES", "make_schedule"]


def _order(views: int, m: int, micro_major: bool) -> list[tuple[int, int]]:
    pairs = [(v, i) for v in range(views) for i in range(m)]
    return sorted(pairs, key=lambda p: (p[1], p[0])) if micro_major else pairs


def _sf(j: int, b: int, views: int, m: int, micro_major: bool = False) -> list[Task]:
    return [Task("sf", j, b, v, i) for v, i in _order(views, m, micro_major)]


def _sb(j: int, b: int, views: int, m: int, micro_major: bool = False) -> list[Task]:
    return [Task("sb", j, b, v, i) for v, i in reversed(_order(views, m, micro_major))]


def _tf(j: int, b: int, views: int, m: int, micro_major: bool = False) -> list[Task]:
    return [Task("tf", j, b, v, i) for v, i in _order(views, m, micro_major)]


def _losses(j: int, b: int, m: int, loss: str) -> list[Task]:
    return [Task("loss", j, b, 0, i) for i in range(m if loss != "batch" else 1)]


def _tspipe(
    n: int, m: int, views: int, mode: str, staleness: int, batches: int, loss: str
) -> list[list[Task]]:
    devices: list[list[Task]] = [[] for _ in range(n)]
    hoist = mode == "kd" or staleness >= 1
    mm = loss != "batch" and views > 1
    for j in range(n):
        out = devices[j]
        out += _tf(j, 0, views, m, mm)  # the prologue: batch 0's teacher forward
        for b in range(batches):
            nxt = _tf(j, b + 1, views, m, mm) if b + 1 < batches else []
            # Device j waits about 2(N-1-j) slots for its gradients and 2j for the next batch.
            before = (
                round(len(nxt) * (n - 1 - j) / (n - 1)) if n > 1 and hoist else (len(nxt) if hoist else 0)
            )
            out += _sf(j, b, views, m, mm)
            out += nxt[:before]
            if j == n - 1:
                out += _losses(j, b, m, loss)
            out += _sb(j, b, views, m, mm)
            if hoist:
                out += nxt[before:]
                out.append(Task("opt", j, b))
            else:  # synchronous teacher: its forward of b+1 needs the EMA of step b
                out.append(Task("opt", j, b))
                out += nxt
    return devices


def _teacher_slots(
    j: int, b: int, views: int, m: int, mode: str, staleness: int, batches: int, mm: bool = False
) -> tuple[list[Task], list[Task]]:
    """Teacher forwards a flushing schedule runs at the start of batch ``b`` and just before its
    optimizer step: a one-step-late momentum teacher must read the weights before ``opt(b)``
    changes them, so its forward of ``b+1`` goes there; otherwise batch ``b``'s own goes first."""
    if mode == "momentum" and staleness == 1:
        first = _tf(j, 0, views, m, mm) if b == 0 else []
        return first, (_tf(j, b + 1, views, m, mm) if b + 1 < batches else [])
    return _tf(j, b, views, m, mm), []


def _gpipe(
    n: int, m: int, views: int, mode: str, staleness: int, batches: int, loss: str
) -> list[list[Task]]:
    """Teacher pipeline, then student pipeline with a flush, per batch (as a GPipe user would)."""
    devices: list[list[Task]] = [[] for _ in range(n)]
    mm = loss != "batch" and views > 1
    for j in range(n):
        for b in range(batches):
            first, last = _teacher_slots(j, b, views, m, mode, staleness, batches, mm)
            devices[j] += first + _sf(j, b, views, m, mm)
            if j == n - 1:
                devices[j] += _losses(j, b, m, loss)
            devices[j] += _sb(j, b, views, m, mm) + last + [Task("opt", j, b)]
    return devices


def _1f1b(n: int, m: int, views: int, mode: str, staleness: int, batches: int, loss: str) -> list[list[Task]]:
    """One forward, one backward (PipeDream-flush / Megatron): stage ``j`` runs ``N - j`` warm-up
    forwards, then alternates. Backward of a micro-batch starts as soon as its own loss is
    known, so this schedule takes one loss per micro-batch (a mean over samples decomposes;
    InfoNCE over the whole batch does not: use ``tspipe`` or ``gpipe`` for that)."""
    devices: list[list[Task]] = [[] for _ in range(n)]
    for j in range(n):
        for b in range(batches):
            micro = [[Task("sf", j, b, v, i) for v in range(views)] for i in range(m)]
            # Micro-batch-major, like the student's forwards (BatchNorm sees one order per model).
            first, last = _teacher_slots(j, b, views, m, mode, staleness, batches, True)
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


def _sequential(
    n: int, m: int, views: int, mode: str, staleness: int, batches: int, loss: str
) -> list[list[Task]]:
    """Inter-layer model parallelism without micro-batching (the paper's baseline)."""
    return _gpipe(n, 1, views, mode, staleness, batches, loss)


_FIXED = {"tspipe": _tspipe, "gpipe": _gpipe, "1f1b": _1f1b, "sequential": _sequential}
SCHEDULES = ("auto", *_FIXED)


@functools.lru_cache(maxsize=64)
def _synthesized(
    skeleton: Schedule, costs: StageCosts, max_in_flight: int, split: bool | None, quick: bool
) -> Templates:
    s = skeleton
    known = {  # the fixed schedules that fit the loss granularity and the memory cap
        name: tuple(tuple(d) for d in _FIXED[name](s.n_stages, s.micro_batches, s.views, s.mode, s.staleness,
                                                    HORIZON, s.loss))
        for name in (("tspipe", "gpipe") if s.loss == "batch" else ("1f1b", "tspipe"))
        if s.teacher_parts == 1 and s.stages_per_device == 1
    }  # fmt: skip
    known = {
        name: lists for name, lists in known.items()
        if validate(dataclasses.replace(s, n_batches=HORIZON, devices=lists))["max_in_flight"] <= max_in_flight
    }  # fmt: skip
    best = templates(skeleton, costs, max_in_flight=max_in_flight, known=known, quick=quick,
                     split_options=((True,) if quick else (False, True)) if split is None else (split,))  # fmt: skip
    return repair(skeleton, costs, best) if not quick and not best.variant.startswith("as ") else best


def make_schedule(
    name: str,
    n_stages: int,
    micro_batches: int,
    *,
    views: int = 1,
    mode: str = "kd",
    staleness: int = 1,
    n_batches: int = 4,
    loss: str = "batch",
    costs: StageCosts | None = None,
    split_backward: bool | None = None,
    max_in_flight: int | None = None,
    teacher_parts: int = 1,
    stages_per_device: int = 1,
    quick: bool = False,
) -> Schedule:
    """Build a schedule by name: ``auto``, ``tspipe``, ``gpipe``, ``1f1b`` or ``sequential``.

    ``loss`` is the loss granularity (:data:`~tspipe_fx.schedule.task.LOSSES`; ``1f1b`` needs a
    loss per micro-batch and takes ``micro`` for ``batch``). ``auto`` synthesizes the lists for
    ``costs`` (default: unit costs), splitting the backward where ``split_backward`` allows
    (None: where it pays), with at most ``max_in_flight`` micro-batches' activations per device
    (default: all of a batch's). ``quick``: a fast first estimate of ``auto`` (the fixed
    schedules and the synthesizer's two main variants, unrepaired), for ranking many partitions;
    never faster than the full synthesis on the same costs. ``stages_per_device`` (``auto``
    only): virtual stages, stage ``j`` on device ``j % (n_stages // stages_per_device)``.

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
    if loss not in LOSSES:
        raise ScheduleError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if isinstance(teacher_parts, bool) or not isinstance(teacher_parts, int) or teacher_parts < 1:
        raise ScheduleError(f"teacher_parts must be an integer >= 1, got {teacher_parts!r}")
    if teacher_parts > 1 and name != "auto":
        raise ScheduleError(
            f"{name} runs the teacher in the student's micro-batches; teacher_parts needs 'auto'"
        )
    if stages_per_device != 1 and name != "auto":
        raise ScheduleError(
            f"{name} runs one stage per device; virtual stages (stages_per_device={stages_per_device!r}) "
            "need 'auto'"
        )
    if name == "1f1b" and loss == "batch":
        loss = "micro"
    m = 1 if name == "sequential" else micro_batches
    staleness = staleness if mode == "momentum" else 0
    skeleton = Schedule(name, n_stages, m, views, mode, staleness, n_batches, (), loss=loss,
                        teacher_parts=teacher_parts, stages_per_device=stages_per_device)  # fmt: skip
    if name != "auto":
        lists = _FIXED[name](n_stages, m, views, mode, staleness, n_batches, loss)
        return Schedule(
            name, n_stages, m, views, mode, staleness, n_batches, tuple(tuple(d) for d in lists), loss=loss
        )
    if costs is None:
        costs = StageCosts.unit(n_stages)
    if costs.n_stages != n_stages:
        raise ScheduleError(f"costs are for {costs.n_stages} stages, the schedule has {n_stages}")
    if isinstance(max_in_flight, bool) or (
        max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1)
    ):
        raise ScheduleError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
    whole = m * views
    cap = whole if loss == "batch" or max_in_flight is None else max(views, min(whole, max_in_flight))
    cap *= stages_per_device  # (counted per device: a micro-batch held by each of its stages)
    t = _synthesized(dataclasses.replace(skeleton, n_batches=1), costs, cap, split_backward, quick)
    return dataclasses.replace(periodic(skeleton, t, n_batches), variant=t.variant)
