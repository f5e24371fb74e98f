"""The schedule validator: a schedule is proven before anything runs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tspipe_fx.schedule.task import (
    Schedule,
    ScheduleError,
    Task,
    dependencies,
    dependency_map,
    must_precede,
    order_key,
    task_devices,
    window_ends,
)

__all__ = ["validate"]


def validate(s: Schedule, *, max_in_flight: int | None = None) -> dict[str, int]:
    """Prove ``s``: every task once on its device, dependencies satisfiable without deadlock,
    stale-teacher orderings kept, activations in flight bounded.

    Returns ``{"max_in_flight": ...}`` (student micro-batches forwarded but not yet backwarded
    on one device, at most). Raises :class:`ScheduleError` naming the first violation.
    """
    expected = task_devices(s)
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
    needs = dependency_map(s)  # (every task is one the schedule must contain: checked above)
    for d, tasks in enumerate(s.devices):
        for i, t in enumerate(tasks):
            for dep in needs[t]:
                dd, di = position[dep]
                if dd == d and di > i:
                    raise ScheduleError(f"{s.name}: device {d} runs {t} before {dep}, which it needs")
            for later in must_precede(s, t):
                if position[later][1] < i:
                    raise ScheduleError(
                        f"{s.name}: device {d} runs {later} before {t}, so the teacher would see weights "
                        f"newer than staleness {s.staleness} allows"
                    )
    _check_forward_order(s)
    _check_windows(s, needs)
    _check_deadlock(s, position)
    return {"max_in_flight": _in_flight(s, max_in_flight)}


def _check_forward_order(s: Schedule) -> None:
    """Every stage runs the forwards of a batch in one order (views first, or micro-batches first
    when the loss is per micro-batch): BatchNorm statistics depend on it, and the reference
    trainer runs that order."""
    seen: dict[tuple[int, str], list[Task]] = {}
    for _, t in s.tasks():
        if t.kind in ("sf", "tf"):
            seen.setdefault((t.stage, t.kind), []).append(t)
    for (j, kind), tasks in seen.items():
        keys = [(t.batch, *order_key(s, t)) for t in tasks]
        if keys != sorted(keys):
            order = "micro-batches first" if s.micro_major else "views first"
            at = next(i for i in range(1, len(keys)) if keys[i] < keys[i - 1])
            raise ScheduleError(
                f"{s.name}: stage {j} runs {tasks[at - 1]} before {tasks[at]}: its {kind} tasks are not in "
                f"one order (batch by batch, {order}), so BatchNorm would see another order than the "
                "reference trainer"
            )


def _check_windows(s: Schedule, needs: Mapping[Task, Sequence[Task]]) -> None:
    """A value that crosses devices is sent and received in one window (each device's window
    ``b`` ends with its first stage's optimizer step of ``b``, :func:`window_ends`): the runtimes
    run the schedule window by window, and a message left by one window would find nobody to
    take it in the next. A device's other stages take their step of ``b`` in its window ``b``."""
    window: dict[Task, tuple[int, int]] = {}
    for d, tasks in enumerate(s.devices):
        ends, w = set(window_ends(tasks)), 0
        for i, t in enumerate(tasks):
            window[t] = (d, w)
            w += i in ends
    for t, (d, w) in window.items():
        if t.kind == "opt" and w != t.batch:
            raise ScheduleError(
                f"{s.name}: device {d} runs {t} (stage {t.stage}) in its window {w}: a device takes every "
                f"stage's step of batch {t.batch} in its window {t.batch}, which ends with its first stage's"
            )
        for dep in needs[t]:
            dd, dw = window[dep]
            if dd != d and dw != w:
                raise ScheduleError(
                    f"{s.name}: device {dd} sends {dep} in its window {dw}, device {d} takes it for {t} in its "
                    f"window {w}: the runtimes run one window at a time, so a message cannot cross windows"
                )


def _check_deadlock(s: Schedule, position: dict[Task, tuple[int, int]]) -> None:
    """Run the lists with blocking receives and zero costs; every task must complete."""
    done: set[Task] = set()
    needs = dependency_map(s)
    heads = [0] * len(s.devices)
    progress = True
    while progress:
        progress = False
        for d, tasks in enumerate(s.devices):
            while heads[d] < len(tasks) and all(dep in done for dep in needs[tasks[heads[d]]]):
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
            elif t.kind == ("sw" if s.split_backward else "sb"):  # the stage's activations are freed
                live -= 1
    return worst
