"""Critical-path repair of a periodic schedule: let the student's chain pass a teacher forward.

A static task order holds whatever the placement planned, but in the repeated schedule a
student task may arrive while a long teacher forward (12–14 ms a micro-batch for a ViT-L stage
on an H100) has just started on its device: the student's chain then waits, and with it every
device. :func:`repair` follows the simulated critical path of the steady state and, where a
task waited behind a teacher forward it did not need, moves it ahead of that forward in the
steady window; a move is kept when the simulated period gets shorter.
"""

from __future__ import annotations

import dataclasses

from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.periodic import Templates, periodic
from tspipe_fx.schedule.simulator import Timeline, simulate_costs
from tspipe_fx.schedule.task import Schedule, ScheduleError, Task, dependencies, window_ends

__all__ = ["repair"]

_BATCHES = 6  # the periodic schedule simulated; windows 1..4 are steady


def _waits(tl: Timeline, costs: StageCosts) -> list[tuple[int, Task, Task]]:
    """Along the critical path of the steady state, back from its last step: ``(device, task,
    forward)`` where ``task`` was ready before ``forward`` (a teacher forward just before it on
    its device, which it does not need) finished, and started when it did."""
    s = tl.schedule
    where: dict[Task, tuple[float, float, int]] = {}
    before: dict[Task, Task | None] = {}
    for d, spans in enumerate(tl.spans):
        for i, (a, b, x) in enumerate(spans):
            where[x] = (a, b, d)
            before[x] = spans[i - 1][2] if i else None
    lo = tl.batch_end(1)
    t: Task | None = max(
        (x for x in where if x.kind == "opt" and x.batch == s.n_batches - 2), key=lambda x: where[x][1]
    )
    out = []
    while t is not None and where[t][0] > lo:
        a, _, d = where[t]
        deps = dependencies(s, t)
        ready = max(
            (where[p][1] + (costs.link_ms(p, t) if where[p][2] != d else 0.0) for p in deps), default=0.0
        )
        prev = before[t]
        if prev is not None and abs(where[prev][1] - a) < 1e-9 and ready < a - 1e-9:
            if prev.kind == "tf" and t.kind != "opt" and prev not in deps:
                out.append((d, t, prev))
            t = prev
            continue
        t = next(
            (
                p
                for p in deps
                if abs(where[p][1] + (costs.link_ms(p, t) if where[p][2] != d else 0.0) - a) < 1e-9
            ),
            None,
        )
    return out


def _moved(t: Templates, s: Schedule, device: int, task: Task, forward: Task) -> Templates | None:
    """The templates with ``task`` just before ``forward`` in the steady window, or None when the
    two are not in one steady window."""
    tasks = s.devices[device]
    i = tasks.index(task)
    ends = window_ends(tasks)
    w = sum(1 for k in ends if k < i)
    if not 1 <= w <= s.n_batches - 2:
        return None
    start = ends[w - 1] + 1
    steady = list(t.steady[device])
    a, b = tasks.index(forward) - start, i - start
    if (
        a < 0
        or steady[b] != task.with_batch(task.batch - w)
        or steady[a] != forward.with_batch(forward.batch - w)
    ):
        return None
    steady.insert(a, steady.pop(b))
    lists = tuple(tuple(steady) if d == device else x for d, x in enumerate(t.steady))
    return dataclasses.replace(
        t, steady=lists, variant=t.variant + ("" if "repaired" in t.variant else ", repaired")
    )


def repair(skeleton: Schedule, costs: StageCosts, t: Templates, *, budget: int = 40) -> Templates:
    """Moves along the critical path while the period gets shorter (at most ``budget``
    simulations); every kept move is proven by the validator."""
    from tspipe_fx.schedule.validator import validate

    priced = costs.for_schedule(t.split_backward, skeleton.teacher_parts)
    best = simulate_costs(periodic(skeleton, t, _BATCHES), costs)
    tried: set[tuple[int, Task, Task]] = set()
    while budget > 0:
        s = best.schedule
        improved = False
        for d, task, forward in _waits(best, priced):
            key = (d, task.with_batch(0), forward.with_batch(0))
            if key in tried:
                continue
            tried.add(key)
            cand = _moved(t, s, d, task, forward)
            if cand is None:
                continue
            budget -= 1
            try:
                schedule = periodic(skeleton, cand, _BATCHES)
                validate(schedule)
            except ScheduleError:  # a move that breaks a rule is not kept
                continue
            tl = simulate_costs(schedule, costs)
            if tl.period < best.period - 1e-9:
                t, best, improved = cand, tl, True
                break
            if budget <= 0:
                break
        if not improved:
            break
    return t
