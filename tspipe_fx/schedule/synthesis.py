"""The schedule synthesizer (``schedule="auto"``): task lists made for the plan's costs.

List scheduling on the task graph of a few batches (Graham; highest level first): whenever a
device is free it runs, among its tasks whose inputs have arrived, the one with the longest
path to the end of the run (its *bottom level*, task and link times included). The student's
critical chain (forward, loss, backward, optimizer step, next forward) is the longest, so it
goes first; teacher forwards and deferred weight gradients, with short paths, fill the gaps.
With virtual stages a variant puts ready backwards first (1F1B's rule), as every micro-batch's
path is then about as long as the next one's.

The lists must also respect what the trainer runs (:mod:`~tspipe_fx.schedule.task_graph`):
windows (each device's window ``b`` ends with its first stage's optimizer step of ``b``, and the
teacher forwards of ``b+1`` run inside it), forwards in one order per stage (BatchNorm), and a
cap on the micro-batches whose activations a device holds. From a run of ``HORIZON`` batches
(twice as many with virtual stages: :func:`~tspipe_fx.schedule.periodic.horizon_of`) it takes
the first window, one steady window (repeated) and the last, and keeps the variant whose
repeated schedule simulates fastest; the result is periodic, so the trainer's windows and the
simulator's period describe one schedule.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq

from tspipe_fx.schedule.costs import StageCosts
from tspipe_fx.schedule.periodic import HORIZON, Lists, Templates, horizon_of, periodic, window_lists
from tspipe_fx.schedule.simulator import simulate_costs
from tspipe_fx.schedule.task import Schedule, ScheduleError, Task, order_key
from tspipe_fx.schedule.task_graph import Early, TaskGraph
from tspipe_fx.schedule.validator import validate

__all__ = ["insertion_schedule", "list_schedule", "templates"]

_FIRST = 1e12  # added to a priority: ahead of every bottom level (milliseconds)


def list_schedule(
    s: Schedule,
    costs: StageCosts,
    early: Early,
    *,
    max_in_flight: int,
    lookahead: bool,
    backward_first: bool = False,
) -> Lists:
    """Per-device task lists for the tasks of ``s`` (its ``devices`` are ignored).

    ``max_in_flight``: a device starts no student forward while it holds that many micro-batches'
    activations. ``lookahead``: a device does not start a task that would still run when a task
    with a longer path becomes ready, unless it fits in the wait. ``backward_first``: a ready
    input-gradient backward (or loss) goes before any other task, then the longest path (1F1B's
    rule; with virtual stages every micro-batch's path is about as long as the next one's, so
    the bottom level alone lets the forwards of later micro-batches crowd out the backwards
    that would start the next batch sooner).
    """
    return _list_schedule(TaskGraph.of(s, costs, early), max_in_flight, lookahead, backward_first)


def _list_schedule(
    problem: TaskGraph, max_in_flight: int, lookahead: bool, backward_first: bool = False
) -> Lists:
    s, priced, device, preds, level = problem.s, problem.costs, problem.device, problem.preds, problem.level
    if backward_first:
        level = {t: level[t] + (_FIRST if t.kind in ("sb", "loss") else 0.0) for t in level}
    rank = {t: i for i, t in enumerate(sorted(device))}  # ties: a fixed order
    succs: dict[Task, list[Task]] = {t: [] for t in device}
    for t, ps in preds.items():
        for p in ps:
            succs[p].append(t)
    left = {t: len(ps) for t, ps in preds.items()}
    ready_at: dict[Task, float] = {}
    finish: dict[Task, float] = {}
    n = s.n_devices
    candidates: list[list[Task]] = [[] for _ in range(n)]
    for t, k in left.items():
        if k == 0:
            ready_at[t] = 0.0
            candidates[device[t]].append(t)
    free = [0.0] * n
    live = [0] * n
    frees = "sw" if s.split_backward else "sb"
    out: list[list[Task]] = [[] for _ in range(n)]
    heap: list[tuple[float, int]] = []

    def usable(d: int) -> list[Task]:
        return [t for t in candidates[d] if t.kind != "sf" or live[d] < max_in_flight]

    def decision(d: int) -> float | None:
        ok = usable(d)
        return max(free[d], min(ready_at[t] for t in ok)) if ok else None

    for d in range(n):
        when = decision(d)
        if when is not None:
            heapq.heappush(heap, (when, d))
    remaining = len(device)
    while remaining:
        if not heap:
            stuck = {d: [str(t) for t in candidates[d]][:3] for d in range(n) if candidates[d]}
            raise ScheduleError(
                f"the synthesizer cannot go on with at most {max_in_flight} micro-batches in flight "
                f"(waiting: {stuck}); hint: allow more micro-batches in flight"
            )
        when, d = heapq.heappop(heap)
        if decision(d) != when:  # stale entry
            continue
        ok = usable(d)
        now = [t for t in ok if ready_at[t] <= when]
        pick = max(now, key=lambda t: (level[t], -rank[t]))
        if lookahead:
            soon = [
                t for t in ok if when < ready_at[t] < when + priced.task_ms(pick) and level[t] > level[pick]
            ]
            if soon:
                urgent = max(soon, key=lambda t: (level[t], -rank[t]))
                gap = ready_at[urgent] - when
                fits = [t for t in now if priced.task_ms(t) <= gap]
                if not fits:  # wait for it
                    free[d] = ready_at[urgent]
                    heapq.heappush(heap, (decision(d) or free[d], d))
                    continue
                pick = max(fits, key=lambda t: (level[t], -rank[t]))
        start = when
        end = start + priced.task_ms(pick)
        finish[pick] = end
        free[d] = end
        out[d].append(pick)
        candidates[d].remove(pick)
        live[d] += (pick.kind == "sf") - (pick.kind == frees)
        remaining -= 1
        touched = {d}
        for u in succs[pick]:
            left[u] -= 1
            if left[u] == 0:
                du = device[u]
                ready_at[u] = max(
                    (finish[p] + (priced.link_ms(p, u) if device[p] != du else 0.0) for p in preds[u]),
                    default=0.0,
                )
                candidates[du].append(u)
                touched.add(du)
        for e in touched:
            when_e = decision(e)
            if when_e is not None:
                heapq.heappush(heap, (when_e, e))
    return tuple(tuple(x) for x in out)


def insertion_schedule(s: Schedule, costs: StageCosts, early: Early, *, student_first: bool = False) -> Lists:
    """Per-device task lists by insertion (HEFT, Topcuoglu et al. 2002): tasks in order of their
    bottom level, each at the earliest idle gap of its device that is long enough and starts
    after its inputs arrive. ``student_first``: every student task is placed first, as if the
    teacher's outputs were there, and the teacher's forwards then go into the gaps it leaves."""
    return _insertion_schedule(TaskGraph.of(s, costs, early), student_first)


def _insertion_schedule(problem: TaskGraph, student_first: bool) -> Lists:
    s, priced, device, preds, level = problem.s, problem.costs, problem.device, problem.preds, problem.level
    rank = {t: i for i, t in enumerate(sorted(device))}
    depth = problem.depths
    busy: list[list[tuple[float, float, Task]]] = [[] for _ in range(s.n_devices)]
    ended: list[list[float]] = [[] for _ in range(s.n_devices)]  # the slots' ends, in order
    start_of: dict[Task, float] = {}
    finish: dict[Task, float] = {}

    def key(t: Task) -> tuple[object, ...]:
        if student_first and t.kind == "tf":  # after every student task, in the teacher's own order
            return (1, t.batch, t.stage, order_key(s, t))
        return (0, -level[t], depth[t], rank[t])

    for t in sorted(device, key=key):
        d = device[t]
        ready = max(
            (finish[p] + (priced.link_ms(p, t) if device[p] != d else 0.0) for p in preds[t] if p in finish),
            default=0.0,
        )
        cost = priced.task_ms(t)
        slots, ends = busy[d], ended[d]
        at, start = len(slots), max(ready, ends[-1] if ends else 0.0)
        for i in range(bisect.bisect_right(ends, ready), len(slots)):  # the first gap after ``ready``
            lo = max(ready, ends[i - 1] if i else 0.0)  # that holds it (a task of no time never
            if lo + cost <= slots[i][0] and lo < slots[i][0]:  # goes before one at its own time)
                at, start = i, lo
                break
        slots.insert(at, (start, start + cost, t))
        ends.insert(at, start + cost)
        start_of[t], finish[t] = start, start + cost
    return _device_orders(device, preds, start_of)


def _device_orders(device: dict[Task, int], preds: dict[Task, list[Task]], start: dict[Task, float]) -> Lists:
    """Each device's tasks in the order of their planned starts, as far as the dependencies
    between tasks of the same device allow (a placement may have put a task after one that
    needs it: the simulation then delays the later one)."""
    n = max(device.values()) + 1
    mine: list[list[Task]] = [[] for _ in range(n)]
    for t, d in device.items():
        mine[d].append(t)
    out = []
    for d, tasks in enumerate(mine):
        local = {t: [p for p in preds[t] if device[p] == d] for t in tasks}
        waiting = {t: len(ps) for t, ps in local.items()}
        after: dict[Task, list[Task]] = {t: [] for t in tasks}
        for t, ps in local.items():
            for p in ps:
                after[p].append(t)
        heap = [(start[t], t) for t in tasks if waiting[t] == 0]
        heapq.heapify(heap)
        order = []
        while heap:
            _, t = heapq.heappop(heap)
            order.append(t)
            for u in after[t]:
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(heap, (start[u], u))
        out.append(tuple(order))
    return tuple(out)


def _splits(s: Schedule) -> list[Early]:
    """Where the teacher forwards of a batch may go: a momentum teacher has no choice (one step
    late: all in the window before; synchronous: all in its own); a KD teacher tries TSPipe's
    (all before), half before and none before, alike on every stage: a forward whose input came
    from a stage in the window before would need a message across windows, which the runtimes,
    running window by window, do not carry (the validator refuses it)."""
    per = s.teacher_micro * s.views
    if s.mode == "momentum":
        return [(per if s.staleness >= 1 else 0,) * s.n_stages]
    return [(x,) * s.n_stages for x in dict.fromkeys((per, per // 2, 0))]


def templates(
    skeleton: Schedule,
    costs: StageCosts,
    *,
    max_in_flight: int,
    split_options: tuple[bool, ...],
    known: dict[str, Lists],
    quick: bool = False,
) -> Templates:
    """The fastest periodic schedule among the variants (split backward or not, where the
    teacher forwards go, insertion or list scheduling, which steady window of the run) and the
    ``known`` schedules' lists over ``HORIZON`` batches, scored by the simulated period over 6
    batches: never slower than the best of them. ``quick``: the teacher forwards only where
    TSPipe puts them (the first of the splits), one steady window."""
    best: tuple[float, Templates] | None = None
    for name, lists in known.items():
        cand = Templates(
            window_lists(lists, 0),
            window_lists(lists, 1),
            window_lists(lists, HORIZON - 1),
            False,
            f"as {name}",
        )
        period = simulate_costs(periodic(skeleton, cand, 6), costs).period
        if best is None or period < best[0] - 1e-9:
            best = (period, cand)
    n_batches = horizon_of(skeleton.stages_per_device)
    for split in split_options:
        horizon = dataclasses.replace(skeleton, n_batches=n_batches, split_backward=split, devices=())
        for early in _splits(horizon)[:1] if quick else _splits(horizon):
            problem = TaskGraph.of(horizon, costs, early)
            methods = ["insertion", "student first", "lookahead"]
            if skeleton.stages_per_device > 1:
                methods.append("backward first")
            for method in methods:
                if method not in ("lookahead", "backward first"):
                    lists = _insertion_schedule(problem, method == "student first")
                    try:
                        held = validate(dataclasses.replace(horizon, devices=lists))["max_in_flight"]
                    except ScheduleError:
                        continue
                    if held > max_in_flight:
                        continue
                else:
                    bwd = method == "backward first"
                    lists = _list_schedule(problem, max_in_flight, lookahead=not bwd, backward_first=bwd)
                lookahead = method
                first, last = window_lists(lists, 0), window_lists(lists, n_batches - 1)
                for w in range(1, 2 if quick else n_batches - 1):
                    variant = (
                        f"{lookahead}{', split backward' if split else ''}"
                        f", teacher forwards ahead {list(early)}"
                    )
                    cand = Templates(first, window_lists(lists, w), last, split, variant)
                    period = simulate_costs(periodic(skeleton, cand, 6), costs).period
                    if best is None or period < best[0] - 1e-9:
                        best = (period, cand)
    assert best is not None
    return best[1]
